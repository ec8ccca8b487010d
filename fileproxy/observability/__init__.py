"""Metrics (Prometheus and JSON stats) and the access log."""
