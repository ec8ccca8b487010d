"""Server adapters: bytes from clients become requests for the request path (the fast path, aiohttp's
server), fileproxy's own endpoints, and running the whole (gunicorn, dev)."""
