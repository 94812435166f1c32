"""Which container takes a request: Host -> service (router), alias -> IPs
(resolver), a new IP proving itself (proving), the pick and passive ejection
(balancer). No mitmproxy import: pure decisions and their small state.
"""
