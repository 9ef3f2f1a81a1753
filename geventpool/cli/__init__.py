"""The ``geventpool`` command line (``python -m geventpool``, or the ``geventpool`` script).

``services``, ``instances SERVICE``, ``watch SERVICE``, ``call IDL SERVICE METHOD
[JSON_ARGS]`` and ``check-config FILE``; ``geventpool COMMAND --help`` says more. A thin
layer over the library: the registry is read by its ``Membership``, calls go through its
``ServiceClient``, configurations are read by its ``load_config``.

Importing this package applies gevent's monkey-patching (as a gevent program's entry point
does), so that ZooKeeper host names resolve without blocking.
"""

from __future__ import annotations

from gevent import monkey

if not monkey.is_module_patched("socket"):
    monkey.patch_all()

from geventpool.cli.app import main

__all__ = ["main"]
