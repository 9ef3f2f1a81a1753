"""``geventpool instances SERVICE``: every instance a client would route to, and every child
it would leave out, with the reason.

The registry is read by a :class:`~geventpool.discovery.membership.Membership`, the client's
own view: an instance shows its node, address, zone, weight, version, payload format
(``native``, ``curator`` or ``finagle``), TLS (``only``: the port speaks only TLS; ``port N``:
a second port that does; ``no``) and wire (transport/protocol); a rejected child shows its
node and why it was rejected. A service whose path does not exist is an error (exit code 1).
Text from the registry (node names, zones, versions, reasons) has its control characters
escaped.
"""

from __future__ import annotations

import argparse
import sys

from geventpool.cli.common import (
    FAILED,
    OK,
    add_json_option,
    add_registry_options,
    instance_record,
    or_dash,
    print_json,
    table,
    tls_text,
    zookeeper,
)
from geventpool.discovery.membership import Membership
from geventpool.discovery.zk import service_path

HELP = "list a service's instances and its rejected children"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``instances`` to the command line."""
    parser = commands.add_parser("instances", help=HELP, description=__doc__)
    parser.add_argument("service", metavar="SERVICE", help="the service's name under the root")
    add_registry_options(parser)
    add_json_option(parser, "the instances and rejected children")
    parser.set_defaults(run=run, command_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Print the instances and the rejected children; 1 when the service does not exist."""
    path = service_path(args.service, args.root)
    with zookeeper(args) as client:
        if client.exists(path) is None:
            sys.stderr.write(f"geventpool instances: no service {path} in ZooKeeper\n")
            return FAILED
        membership = Membership(client, path=path, empty_protection=0.0)
        membership.start(args.timeout)
        membership.stop()
    instances = sorted(membership.instances.values(), key=lambda inst: inst.id)
    rejected = sorted(membership.rejected.items())
    if args.json:
        print_json(
            {
                "service": args.service,
                "path": path,
                "instances": [instance_record(inst) for inst in instances],
                "rejected": [{"node": node, "reason": reason} for node, reason in rejected],
            }
        )
        return OK
    print(f"{args.service} ({path}): {len(instances)} instances, {len(rejected)} rejected")
    if instances:
        table(
            ("NODE", "ADDRESS", "ZONE", "WEIGHT", "VERSION", "FORMAT", "TLS", "WIRE"),
            [
                (
                    inst.id,
                    str(inst),
                    or_dash(inst.zone),
                    f"{inst.weight:g}",
                    or_dash(inst.version),
                    inst.source,
                    tls_text(inst),
                    f"{inst.transport}/{inst.protocol}",
                )
                for inst in instances
            ],
            sys.stdout,
        )
    if rejected:
        print("rejected:")
        table(("NODE", "REASON"), rejected, sys.stdout)
    return OK
