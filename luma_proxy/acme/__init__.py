"""ACME: what a certificate says and when to renew it (certinfo), and the HTTP-01
client that orders one (client, imported only for an order). The certificate files
themselves, as mitmproxy serves them, are ``proxy.certificates``.
"""
