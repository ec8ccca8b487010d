"""Upstream adapters: sending a request and reading its answer (the lean client, aiohttp's client),
socket-to-socket relay (copy or splice), segmented range fetch, socket options."""
