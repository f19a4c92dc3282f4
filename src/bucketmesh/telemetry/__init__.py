"""Metrics (Prometheus) and logging, shared by every layer above the core."""
