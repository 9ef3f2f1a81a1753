"""``geventpool services``: the services under the root, with their live and rejected
children.

Each child of the root is read as a service by a
:class:`~geventpool.discovery.membership.Membership` (the client's own validation), so the
counts are what a client would route to (``INSTANCES``) and what it would leave out
(``REJECTED``). A root that does not exist is an error (exit code 1): a wrong ``--root``
or chroot, most likely.
"""

from __future__ import annotations

import argparse
import sys

from kazoo.exceptions import NoNodeError

from geventpool.cli.common import (
    FAILED,
    OK,
    add_json_option,
    add_registry_options,
    print_json,
    table,
    zookeeper,
)
from geventpool.discovery.membership import Membership

HELP = "list the services under the root, with their instance counts"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``services`` to the command line."""
    parser = commands.add_parser("services", help=HELP, description=__doc__)
    add_registry_options(parser)
    add_json_option(parser, "the services")
    parser.set_defaults(run=run, command_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Print each service with its counts; 1 when the root does not exist."""
    root = args.root.rstrip("/") or "/"
    rows: list[dict[str, object]] = []
    with zookeeper(args) as client:
        try:
            names = sorted(client.get_children(root))
        except NoNodeError:
            sys.stderr.write(f"geventpool services: no {root} in ZooKeeper at {args.zookeeper}\n")
            return FAILED
        for name in names:
            path = f"{root.rstrip('/')}/{name}"
            membership = Membership(client, path=path, empty_protection=0.0)
            membership.start(args.timeout)
            try:
                rows.append(
                    {
                        "service": name,
                        "path": path,
                        "instances": len(membership.instances),
                        "rejected": len(membership.rejected),
                    }
                )
            finally:
                membership.stop()
    if args.json:
        print_json({"root": root, "services": rows})
        return OK
    if not rows:
        print(f"no services under {root}")
        return OK
    table(
        ("SERVICE", "INSTANCES", "REJECTED"),
        [(str(row["service"]), str(row["instances"]), str(row["rejected"])) for row in rows],
        sys.stdout,
    )
    return OK
