"""Metrics (Prometheus, ``metrics``) and the one logging setup (``log``), shared by
every layer above the core."""
