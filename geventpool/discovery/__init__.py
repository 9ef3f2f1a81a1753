"""Discovery: which instances of a service exist, as ZooKeeper tells.

:mod:`~geventpool.discovery.instance` (the validated value of one instance),
:mod:`~geventpool.discovery.payloads` (native, Curator and Finagle znode payloads),
:mod:`~geventpool.discovery.zk` (kazoo clients on the gevent handler),
:mod:`~geventpool.discovery.reconcile` (the re-sync loop),
:mod:`~geventpool.discovery.registrar` (a server registering itself) and
:mod:`~geventpool.discovery.membership` (a client's watched view).

Discovery imports neither the client nor the server.
"""
