"""The client side: from a call to a connection of one live instance, and back.

:mod:`~geventpool.client.service` (``ServiceClient``) wires the parts: a source of instances
(:mod:`~geventpool.client.source`), the service's pools (:mod:`~geventpool.client.pools`, one
:mod:`~geventpool.client.pool` per instance, each holding :mod:`~geventpool.client.connection`
objects), the choice of an instance (:mod:`~geventpool.client.balancer`), borrowing with
failover (:mod:`~geventpool.client.checkout`), exhaustion reports
(:mod:`~geventpool.client.exhaustion`), borrowed connections (:mod:`~geventpool.client.pinned`)
and fork safety (:mod:`~geventpool.client.forking`).

The client never imports the server.
"""
