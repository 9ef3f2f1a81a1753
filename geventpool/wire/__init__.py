"""The wire: how bytes become Thrift messages and back, shared by the client and the server.

Today: the choice of transport (buffered, framed) and protocol (binary, compact)
(:mod:`~geventpool.wire.codecs`), the failures of the wire that become typed errors, and the
binding of a call's arguments to the IDL (:mod:`~geventpool.wire.arguments`). The message
layer (sequence ids, header checks, limits on every length a peer sends) goes here too.

This package imports nothing of geventpool but :mod:`geventpool.errors`.
"""
