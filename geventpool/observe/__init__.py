"""Integrations that watch clients from outside the call path: Prometheus metrics
(:mod:`geventpool.observe.prometheus`, the ``metrics`` extra). Nothing on the call path
imports this package; it hangs on :mod:`geventpool.client.observing`'s hook and on
``status()``."""
