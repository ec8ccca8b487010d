"""The one request path: what a request means, decided once for every server path and upstream client."""
