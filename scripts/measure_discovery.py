"""How fast a Membership follows ZooKeeper, against a raw kazoo watch on the same changes.

For each of ``--rounds`` rounds one child is created, then deleted. A raw ``get_children``
watch (the floor: one notification) and a Membership (notification, re-list, payload read,
validation, diff) watch the same path in the same process, so both time the same change side
by side; the report gives medians, p90 and max in milliseconds and the ratio of the medians.
Starts its own ZooKeeper. Usage: ``.venv/bin/python scripts/measure_discovery.py``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent.event  # noqa: E402
import structlog  # noqa: E402

from geventpool.discovery.instance import Instance  # noqa: E402
from geventpool.discovery.membership import Instances, Membership, MembershipChange  # noqa: E402
from geventpool.discovery.payloads import encode_instance  # noqa: E402
from geventpool.discovery.zk import connect  # noqa: E402
from geventpool.testing.zookeeper import ZooKeeperServer  # noqa: E402

PATH = "/geventpool/bench"


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {statistics.median(ordered):6.2f}  p90 {p90:6.2f}  max {ordered[-1]:6.2f}"


def _has(name: str, present: bool) -> Callable[[Instances], bool]:
    return lambda view: (name in view) == present


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    with tempfile.TemporaryDirectory() as folder:
        zookeeper = ZooKeeperServer(Path(folder))
        zookeeper.start()
        writer, raw_client, member_client = (connect(zookeeper.hosts) for _ in range(3))
        try:
            writer.ensure_path(PATH)
            membership = Membership(member_client, "bench", empty_protection=0)
            membership.start()
            seen_by_membership: dict[str, float] = {}

            def on_change(change: MembershipChange) -> None:
                now = time.perf_counter()
                for inst in (*change.joined, *change.left):
                    seen_by_membership[inst.id] = now

            membership.subscribe(on_change)
            raw_event = gevent.event.Event()
            raw_seen: list[float] = []

            def raw_watch(_event: object) -> None:
                raw_seen.append(time.perf_counter())
                raw_event.set()

            latency: dict[str, list[float]] = {"raw": [], "membership": []}
            for round_number in range(args.rounds):
                name = f"127.0.0.1:{10000 + round_number}"
                payload = encode_instance(Instance(host="127.0.0.1", port=10000 + round_number))
                for change in ("create", "delete"):
                    raw_client.get_children(PATH, watch=raw_watch)
                    raw_event.clear()
                    seen_by_membership.pop(name, None)
                    started = time.perf_counter()
                    if change == "create":
                        writer.create(f"{PATH}/{name}", payload)
                    else:
                        writer.delete(f"{PATH}/{name}")
                    raw_event.wait(5)
                    present = change == "create"
                    if not membership.wait_for(_has(name, present), 5):
                        raise SystemExit(f"membership missed the {change} of {name}")
                    gevent.sleep(0)  # let the subscriber record its time
                    latency["raw"].append((raw_seen[-1] - started) * 1000)
                    latency["membership"].append((seen_by_membership[name] - started) * 1000)
            membership.stop()
        finally:
            for client in (writer, raw_client, member_client):
                client.stop()
                client.close()
            zookeeper.stop()

    raw, ours = latency["raw"], latency["membership"]
    print(f"{args.rounds} creates and {args.rounds} deletes, latency in ms from the write call")
    print(f"  raw kazoo watch : {summary(raw)}")
    print(f"  Membership view : {summary(ours)}")
    ratio = statistics.median(ours) / statistics.median(raw)
    print(f"  ratio of medians (Membership / raw): {ratio:.2f}")


if __name__ == "__main__":
    main()
