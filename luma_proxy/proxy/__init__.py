"""Everything that runs inside mitmproxy: the only subpackage that imports it.

The composition root (composition) builds the addons in hook order; the routing
addon (addon) holds the hot path; tls serves certificates (certificates: their
files, as mitmproxy's certificate store takes them) and runs the ACME loop;
every touch of mitmproxy internals is in engine_patches.
"""
