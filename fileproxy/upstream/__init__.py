"""Upstream adapters: sending a request and reading its answer (the lean client, aiohttp's client),
zero-copy splice, segmented range fetch, socket options."""
