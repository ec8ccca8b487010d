"""fileproxy: a streaming HTTP reverse proxy for large file transfers over poor networks."""

__version__ = "0.1.0"
