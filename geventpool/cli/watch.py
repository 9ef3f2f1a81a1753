"""``geventpool watch SERVICE``: the service's membership as it changes, one line per change.

It first prints the instances present (``present``) and the children rejected now
(``rejected``), then, as they happen, ``joined``, ``left`` and ``updated`` instances (a new
payload under the same node), newly ``rejected`` children, and the ``zookeeper`` connection's
state changes (``SUSPENDED``, ``CONNECTED``, ``LOST``: while suspended the last view stands).
Each line starts with a UTC timestamp; ``--json`` prints JSON lines instead (``time``,
``event``, ``service``, and ``instance``, ``node`` and ``reason`` or ``state``).

The view is the client's own (:class:`~geventpool.discovery.membership.Membership`) without
empty-list protection: a service whose every instance leaves is shown empty at once. It runs
until SIGINT or SIGTERM, or for ``--duration`` seconds; both end it with exit code 0, a signal
also while it is still connecting to ZooKeeper (at once, without waiting for ``--timeout``). A
service path that does not exist yet is watched until it is created. Text from the registry
(node names, zones, versions, reasons) has its control characters escaped.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Mapping
from typing import Any

import gevent
import gevent.event

from geventpool import events
from geventpool.cli.common import (
    OK,
    CommandInterruptedError,
    add_registry_options,
    instance_record,
    on_signals,
    or_dash,
    positive_seconds,
    print_json,
    printable,
    timestamp,
    tls_text,
    zookeeper,
)
from geventpool.discovery.instance import Instance
from geventpool.discovery.membership import Membership, MembershipChange
from geventpool.discovery.zk import service_path

HELP = "print a service's joins, leaves and updates as they happen"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``watch`` to the command line."""
    parser = commands.add_parser("watch", help=HELP, description=__doc__)
    parser.add_argument("service", metavar="SERVICE", help="the service's name under the root")
    parser.add_argument(
        "--duration",
        type=positive_seconds,
        metavar="SECONDS",
        help="stop after this long (default: until SIGINT or SIGTERM)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    add_registry_options(parser)
    parser.set_defaults(run=run, command_parser=parser, handles_signals=True)


class Printer:
    """Writes one line per membership event, as text or JSON, flushed at once."""

    def __init__(self, service: str, as_json: bool) -> None:
        self.service = service
        self.as_json = as_json

    def instance(self, event: str, inst: Instance) -> None:
        """An instance ``present``, ``joined``, ``left`` or ``updated``."""
        if self.as_json:
            self._json(event, node=inst.id, instance=instance_record(inst))
            return
        details = (
            f"node={inst.id} zone={or_dash(inst.zone)} weight={inst.weight:g}"
            f" version={or_dash(inst.version)} format={inst.source} tls={tls_text(inst)}"
            f" wire={inst.transport}/{inst.protocol}"
        )
        self._text(f"{event:<8} {inst!s:<21} {details}")

    def rejected(self, node: str, reason: str) -> None:
        """A child rejected, with the reason."""
        if self.as_json:
            self._json("rejected", node=node, reason=reason)
        else:
            self._text(f"{'rejected':<8} {node:<21} {reason}")

    def state(self, state: str) -> None:
        """The ZooKeeper connection's new state."""
        if self.as_json:
            self._json("zookeeper", state=state)
        else:
            self._text(f"{'zookeeper':<8} {state}")

    def _json(self, event: str, **fields: Any) -> None:
        print_json({"time": timestamp(), "event": event, "service": self.service, **fields})

    def _text(self, line: str) -> None:
        sys.stdout.write(f"{timestamp()} {printable(line)}\n")
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Print the membership's changes until signalled or ``--duration`` passes; 0."""
    path = service_path(args.service, args.root)
    printer = Printer(args.service, args.json)
    stop = gevent.event.Event()
    try:
        with (
            on_signals(stop.set, signal.SIGINT, signal.SIGTERM),
            zookeeper(args, interrupted=stop) as client,
        ):
            membership = Membership(client, path=path, empty_protection=0.0)
            membership.start(args.timeout)
            try:
                # Nothing below yields before the subscriptions are in place: no change is
                # missed between the first view and them.
                for inst in sorted(membership.instances.values(), key=lambda i: i.id):
                    printer.instance("present", inst)
                for node, reason in sorted(membership.rejected.items()):
                    printer.rejected(node, reason)
                membership.subscribe(lambda change: _changed(printer, change))
                remove = events.add_listener(
                    lambda event, level, fields: _rejected(printer, path, event, fields)
                )
                client.add_listener(printer.state)
                try:
                    stop.wait(args.duration)
                finally:
                    client.remove_listener(printer.state)  # not the LOST of our own close
                    remove()
            finally:
                membership.stop()
    except CommandInterruptedError:
        pass  # signalled before ZooKeeper answered: ended as by a signal later on
    return OK


def _changed(printer: Printer, change: MembershipChange) -> None:
    for kind, instances in (
        ("left", change.left),
        ("joined", change.joined),
        ("updated", change.updated),
    ):
        for inst in instances:
            printer.instance(kind, inst)


def _rejected(printer: Printer, path: str, event: str, fields: Mapping[str, Any]) -> None:
    """An ``instance_rejected`` event of this service's children, as a ``rejected`` line."""
    where = fields.get("path")
    if event == events.INSTANCE_REJECTED and isinstance(where, str):
        parent, _, node = where.rpartition("/")
        if parent == path:
            printer.rejected(node, str(fields.get("reason")))
