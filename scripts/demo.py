"""The geventpool demo: discovery of real Thrift servers through a ZooKeeper it starts itself.

Run through ``scripts/demo.sh`` (which sets everything up first). It starts ZooKeeper and three
echo servers that register themselves, watches them with a Membership, calls every discovered
instance, then: SIGKILLs one (its instance stays until its session times out), starts a new
one (it joins at once), stops one gracefully with SIGTERM (it leaves at once), and prints a
summary. Everything it started is stopped at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402

import structlog  # noqa: E402
from thriftpy2.rpc import make_client  # noqa: E402

from geventpool.membership import Instances, Membership, MembershipChange  # noqa: E402
from geventpool.testing.echo_server import echo_thrift  # noqa: E402
from geventpool.testing.processes import ServerProcess  # noqa: E402
from geventpool.testing.zookeeper import ZooKeeperServer  # noqa: E402
from geventpool.zk import connect  # noqa: E402

SESSION_TIMEOUT = 4.0
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.2f}s] {message}", flush=True)


def show(view: Instances) -> str:
    return ", ".join(sorted(view)) or "(none)"


def call_everyone(view: Instances) -> dict[str, str]:
    """Call whoami() on every instance in the view; the answer, or the error, per instance."""
    answers = {}
    for name, instance in sorted(view.items()):
        try:
            client = make_client(echo_thrift.Echo, instance.host, instance.port, timeout=2000)
            answers[name] = client.whoami()
            client.close()
        except Exception as error:  # noqa: BLE001 - a demo shows errors, it does not stop
            answers[name] = f"{type(error).__name__}"
    return answers


def wait(membership: Membership, what: str, predicate: Callable[[Instances], bool]) -> float:
    started = time.monotonic()
    if not membership.wait_for(predicate, timeout=SESSION_TIMEOUT + 10):
        raise SystemExit(f"demo failed: {what} did not happen")
    took = time.monotonic() - started
    say(f"{what} after {took * 1000:.0f} ms; view: {show(membership.instances)}")
    return took


def main() -> int:
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer()],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),  # warnings and errors only
    )
    figures: dict[str, float] = {}
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="geventpool-demo-")))
        zookeeper = ZooKeeperServer(folder / "zookeeper")
        stack.callback(zookeeper.stop)
        zookeeper.start()
        say(f"ZooKeeper serving on {zookeeper.hosts}")

        def start_server() -> ServerProcess:
            server = ServerProcess(
                ["--zookeeper", zookeeper.hosts, "--session-timeout", str(SESSION_TIMEOUT)],
                log_path=folder / "servers.log",
            )
            stack.callback(server.kill)
            return server.start()

        servers = [start_server() for _ in range(3)]
        say(f"three echo servers registered: {', '.join(s.address for s in servers)}")

        client = connect(zookeeper.hosts)
        stack.callback(client.close)
        stack.callback(client.stop)
        membership = Membership(client, "echo", empty_protection=5.0)
        changes: list[MembershipChange] = []
        membership.subscribe(changes.append)
        membership.start()
        stack.callback(membership.stop)
        say(f"membership loaded: {show(membership.instances)}")
        say(f"each instance answers whoami(): {call_everyone(membership.instances)}")

        victim = servers[0]
        victim.kill()
        say(f"SIGKILL {victim.address}: ZooKeeper keeps its node until the session times out")
        say(f"calls now: {call_everyone(membership.instances)}")
        say("(its calls fail at once: the pool of the next release ejects it locally)")
        figures["killed server left the view (s)"] = wait(
            membership, f"{victim.address} left", lambda v: victim.address not in v
        )

        newcomer = start_server()
        figures["new server joined the view (ms)"] = 1000 * wait(
            membership, f"{newcomer.address} joined", lambda v: newcomer.address in v
        )

        leaving = servers[1]
        leaving.signal(signal.SIGTERM)
        figures["SIGTERM'd server left the view (ms)"] = 1000 * wait(
            membership, f"{leaving.address} left after SIGTERM", lambda v: leaving.address not in v
        )
        say(f"{leaving.address} drained and exited with code {leaving.wait(30)}")
        say(f"each instance answers whoami(): {call_everyone(membership.instances)}")

    say("everything stopped")
    print("\nsummary")
    print(f"  membership changes seen: {len(changes)}")
    print(f"  rejected registry entries: {membership.stats.rejected}")
    for name, value in figures.items():
        print(f"  {name}: {value:.2f}")
    print(f"  session timeout of the servers: {SESSION_TIMEOUT:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
