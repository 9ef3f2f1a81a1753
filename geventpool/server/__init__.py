"""The server side: :mod:`~geventpool.server.thrift_server` serves a thriftpy2 handler on gevent
and registers it (through :mod:`geventpool.discovery`) while it serves."""
