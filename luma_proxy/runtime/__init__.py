"""Processes: what `run` decides before mitmproxy is imported (startup), what it
was asked for (runconfig), `--workers` (workers: supervisor and worker side),
which process leads the health checks and ACME orders (leadership), and which
routes generation each process serves (served).
"""
