"""Policies of the request path: admission, retries, circuit breakers, balancing, active health."""
