"""docs/operations.md and the Grafana dashboard docs/grafana/geventpool.json name only what
exists: every metric in their PromQL is a series that a real scrape exposes (a client with a
static instance and a real ThriftServer, watched and called), with labels and label values it
carries; every event and alert condition they quote is one the library has. The two structlog
configurations of the page are run (with its demonstration appended) and their output checked,
the pasted output included, and every ``jq`` filter of the page is run over the JSON lines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from geventpool import events
from geventpool.alerts.conditions import CONDITIONS
from geventpool.client.observing import OUTCOMES
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.observe.prometheus import ZOOKEEPER_STATES, ClientMetrics, ServerMetrics
from geventpool.server.observing import SERVER_OUTCOMES
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import echo_thrift

pytestmark = pytest.mark.gevent_timeout(60)

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
DASHBOARD = ROOT / "docs" / "grafana" / "geventpool.json"

EVENT_NAMES = frozenset(
    value
    for name, value in vars(events).items()
    if name.isupper() and isinstance(value, str) and name != "LOGGER_NAME"
)
CONDITION_NAMES = frozenset(condition.name for condition in CONDITIONS)

METRIC = re.compile(r"\bgeventpool_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(geventpool_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TARGET_LABELS = frozenset({"instance", "job"})  # what Prometheus gives every scraped series
EVENT_MATCH = re.compile(r'\bevent"?\s*(?:==|=~|!=|=)\s*"([^"]+)"')
CONDITION_MATCH = re.compile(r'\bcondition"?\s*(?:==|=~|!=|=)\s*"([^"]+)"')
LINE_FILTER = re.compile(r'\|=\s*"([^"]+)"')
STARTS_WITH = re.compile(r'startswith\("([^"]+)"\)')
FENCE = re.compile(r"^(?:<!-- snippet: (\w+) -->\n)?```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
JQ = re.compile(r"\bjq ((?:-\w+ )*)'([^']*)' app\.log")
BACKTICKED = re.compile(r"`([^`]+)`")
STALE = "the page's pasted output is stale: run the snippet with the demonstration, paste it"


# -- what exists -------------------------------------------------------------------------------


Exposed = dict[str, frozenset[str] | None]  # series name -> label names (None: no sample seen)


@pytest.fixture
def exposed(serve: Callable[..., ThriftServer]) -> Exposed:
    """Every series name of a real scrape: a client (static instance) and a ThriftServer,
    watched in a fresh registry after a few calls. A counter family ``x`` exposes ``x_total``,
    a histogram ``x_bucket``, ``x_sum`` and ``x_count``; each maps to the label names its
    samples carry (``None`` for a family with no sample here, such as the ZooKeeper state of
    a client without a registry)."""
    server = serve()
    registry = CollectorRegistry()
    client_metrics = ClientMetrics(registry)
    ServerMetrics(registry).watch(server)
    client = client_metrics.watch(
        ServiceClient(
            echo_thrift.Echo, "echo", instances=[Instance(host="127.0.0.1", port=server.port)]
        )
    )
    with client:
        for n in range(3):
            assert client.echo(str(n)) == str(n)
        text = generate_latest(registry).decode()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    series: Exposed = {}
    for family in text_string_to_metric_families(text):
        labels = frozenset(label for sample in family.samples for label in sample.labels)
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = labels or None
    assert "geventpool_client_calls_total" in series
    assert "geventpool_server_refused_total" in series
    return series


def label_values(label: str, metric: str) -> frozenset[str] | None:
    """The values ``label`` of ``metric`` can take, where the library bounds them."""
    if label == "outcome":
        return frozenset(SERVER_OUTCOMES if "_server_" in metric else OUTCOMES)
    if label == "state":
        return frozenset(ZOOKEEPER_STATES)
    if label == "reason":
        return frozenset({"over_limits", "malformed"})
    return None


def check_promql(expr: str, exposed: Exposed, where: str) -> set[str]:
    """Assert that ``expr`` names at least one metric, only exposed series, with their labels
    and bounded label values, and that its brackets balance; return the series named."""
    names = set(METRIC.findall(expr))
    assert names, f"{where}: no geventpool metric in {expr!r}"
    for name in names:
        assert name in exposed, f"{where}: {name} is not a series the library exposes ({expr!r})"
    for opening, closing in ("()", "{}", "[]"):
        assert expr.count(opening) == expr.count(closing), f"{where}: unbalanced {expr!r}"
    known = set(TARGET_LABELS)
    for name in names:
        known |= exposed[name] or set()
    unseen = any(exposed[name] is None for name in names)  # labels unknown: not checked
    for grouping in [] if unseen else GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            assert label in known, f"{where}: no series of {expr!r} has a label {label!r}"
    for name, matchers in SELECTOR.findall(expr):
        labels = exposed[name]
        for label, value in MATCHER.findall(matchers):
            if labels is not None:
                assert label in labels, f"{where}: {name} has no label {label!r}"
            allowed = label_values(label, name)
            if allowed is None or "$" in value:
                continue
            for alternative in value.split("|"):
                if alternative not in (".*", ".+"):
                    assert alternative in allowed, f"{where}: {name}{{{label}={alternative!r}}}"
    return names


# -- the page ----------------------------------------------------------------------------------


def page() -> str:
    return OPERATIONS.read_text(encoding="utf-8")


def blocks(language: str | None = None) -> list[tuple[str | None, str, str]]:
    """The page's fenced code blocks: (snippet marker or None, language, body)."""
    found = [(marker or None, lang, body) for marker, lang, body in FENCE.findall(page())]
    return [block for block in found if language is None or block[1] == language]


def snippet(name: str) -> str:
    (body,) = [body for marker, _, body in blocks() if marker == name]
    return body


def promql_expressions() -> list[str]:
    """Each line of the ``promql`` blocks (comments aside), and each Prometheus rule's expr."""
    expressions = [
        line
        for _, _, body in blocks("promql")
        for line in body.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for _, _, body in blocks("yaml"):
        expressions += [e for e in re.findall(r"^\s*expr: (.+)$", body, re.M) if "| json" not in e]
    return expressions


def logql_expressions() -> list[str]:
    """Each line of the ``logql`` blocks, and each Loki rule's expr."""
    expressions = [line for _, _, body in blocks("logql") for line in body.splitlines() if line]
    for _, _, body in blocks("yaml"):
        expressions += [e for e in re.findall(r"^\s*expr: (.+)$", body, re.M) if "| json" in e]
    return expressions


def tables() -> Iterator[tuple[list[str], list[list[str]]]]:
    """The page's Markdown tables: headers and rows of cells."""
    lines = page().splitlines()
    for index, line in enumerate(lines):
        if line.startswith("|") and index + 1 < len(lines) and lines[index + 1].startswith("|--"):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for row in lines[index + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip("|").split("|")])
            yield header, rows


def test_every_promql_expression_of_the_page_names_only_exposed_series(exposed: Exposed) -> None:
    expressions = promql_expressions()
    assert len(expressions) > 40
    named: set[str] = set()
    for expr in expressions:
        named |= check_promql(expr, exposed, "docs/operations.md")
    for name in METRIC.findall(page()):  # in tables and prose too, histograms by family
        known = name in exposed or f"{name}_bucket" in exposed
        assert known, f"docs/operations.md names {name}, which is not exposed"
    assert "geventpool_client_zookeeper_state" in named
    assert "geventpool_server_refused_total" in named


def test_every_event_and_condition_the_page_quotes_exists() -> None:
    text = page()
    quoted = EVENT_MATCH.findall(text)
    assert len(quoted) > 20
    for value in quoted:
        for name in value.split("|"):
            assert name in EVENT_NAMES, f"docs/operations.md queries an unknown event {name!r}"
    for value in CONDITION_MATCH.findall(text):
        for name in value.split("|"):
            assert name in CONDITION_NAMES, f"unknown condition {name!r}"
    for prefix in STARTS_WITH.findall(text):
        assert any(event.startswith(prefix) for event in EVENT_NAMES), prefix
    for expr in logql_expressions():  # a line filter must keep the lines the query selects
        selected = [name for value in EVENT_MATCH.findall(expr) for name in value.split("|")]
        assert selected, expr
        for kept in LINE_FILTER.findall(expr):
            assert all(kept in name for name in selected), f"|= {kept!r} drops lines of {expr}"
    checked = 0
    for header, rows in tables():
        for column, title in enumerate(header):
            if title in ("event", "events", "starts on", "ends on"):
                known, what = EVENT_NAMES, "event"
            elif title in ("alert", "condition"):
                known, what = CONDITION_NAMES, "condition"
            else:
                continue
            for row in rows:
                for name in BACKTICKED.findall(row[column]):
                    assert name in known, f"table column {title!r}: {name!r} is no {what}"
                    checked += 1
    assert checked > 40
    headed = re.findall(r"^#+ Alert `(\w+)`", text, re.MULTILINE)
    assert sorted(headed) == sorted(CONDITION_NAMES), "one section per alert condition"


# -- the dashboard -----------------------------------------------------------------------------


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))  # a collapsed row's


def test_the_dashboard_is_valid_and_names_only_exposed_series(exposed: Exposed) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    query = variables["service"]["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(geventpool_client_calls_total, service)"
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    named: set[str] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            named |= check_promql(target["expr"], exposed, f"panel {panel['title']!r}")
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exposed}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in named}
    assert families <= shown, f"families on no panel: {sorted(families - shown)}"


# -- the structlog configurations, run ---------------------------------------------------------


def run_script(source: str, folder: Path) -> subprocess.CompletedProcess[str]:
    script = folder / "snippet.py"
    script.write_text(source, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
        check=False,
    )


def pasted_output(name: str) -> list[str]:
    """The output block that follows the snippet ``name`` on the page."""
    text = page()
    after = text[text.index(f"<!-- snippet: {name} -->") :]
    after = after[after.index("Output of the demonstration") :]
    body = after.split("```\n", 2)[1]
    return body.splitlines()


def events_and_statuses(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((entry["event"], entry.get("status", "")) for entry in entries)


@pytest.fixture(scope="module")
def json_lines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JSON lines the page's snippet (b) writes with the demonstration appended."""
    folder = tmp_path_factory.mktemp("jsonlines")
    run = run_script(snippet("json") + "\n" + snippet("demo"), folder)
    assert run.returncode == 0, run.stderr
    (folder / "app.log").write_text(run.stdout, encoding="utf-8")
    return folder / "app.log"


def test_the_json_lines_configuration_writes_one_json_object_per_event(json_lines: Path) -> None:
    entries = [json.loads(line) for line in json_lines.read_text(encoding="utf-8").splitlines()]
    for entry in entries:
        assert entry["event"] in EVENT_NAMES
        assert entry["level"] in ("debug", "info", "warning", "error")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", entry["timestamp"]), entry
    exhausted = [entry for entry in entries if entry["event"] == "pool_exhausted"]
    assert exhausted and exhausted[0]["level"] == "error" and exhausted[0]["service"] == "echo"
    alerts = [
        (entry["status"], entry["condition"]) for entry in entries if entry["event"] == "alert"
    ]
    assert alerts == [("firing", "pool_exhausted"), ("resolved", "pool_exhausted")]
    pasted = [json.loads(line) for line in pasted_output("json")]
    assert events_and_statuses(pasted) == events_and_statuses(entries), STALE


def test_the_stdlib_configuration_reaches_the_logging_handlers(tmp_path: Path) -> None:
    run = run_script(snippet("stdlib") + "\n" + snippet("demo"), tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""  # everything went through the logging handler (on stderr)
    record = re.compile(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) +geventpool: "
        r"event='(\w+)'(?:.* status='(\w+)')?"
    )

    def parse(lines: list[str]) -> list[dict[str, Any]]:
        entries = []
        for line in lines:
            match = record.match(line)
            assert match, line
            level, event, status = match.groups()
            assert event in EVENT_NAMES
            entries.append({"level": level, "event": event, "status": status or ""})
        return entries

    entries = parse(run.stderr.splitlines())
    assert {"level": "ERROR", "event": "pool_exhausted", "status": ""} in entries
    assert {"level": "ERROR", "event": "alert", "status": "firing"} in entries
    assert events_and_statuses(parse(pasted_output("stdlib"))) == events_and_statuses(entries), (
        STALE
    )


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_every_jq_filter_of_the_page_runs_over_the_json_lines(json_lines: Path) -> None:
    written = {json.loads(line)["event"] for line in json_lines.read_text().splitlines()}
    filters = JQ.findall(page())
    assert len(filters) >= 8
    for flags, program in filters:
        run = subprocess.run(
            ["jq", *flags.split(), program, str(json_lines)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert run.returncode == 0, f"jq {flags}'{program}': {run.stderr}"
        asked = {name for value in EVENT_MATCH.findall(program) for name in value.split("|")}
        if asked & written:
            assert run.stdout.strip(), f"jq {flags}'{program}' found nothing"
