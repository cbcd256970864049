"""The Grafana dashboard and the KEDA trigger ask only for metrics and labels the processes export.

A query naming a metric nobody registers draws an empty panel, or scales on
nothing, without an error; so their PromQL is read here and checked against
the registries of the real producer, source and consumer objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from async_component.dataplane import sink
from async_component.dataplane.producer import Producer
from async_component.dataplane.replay import Replayer
from async_component.dataplane.source import Source
from async_component.settings import ConsumerSettings, ProducerSettings, SourceSettings

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ROOT / "component" / "config" / "components"
DASHBOARD = COMPONENTS / "monitoring" / "async-component.json"
SCALED_OBJECT = COMPONENTS / "keda" / "scaled-object.yaml"

# The samples each metric type exposes, by suffix of the family's name.
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
                   "histogram": ("_bucket", "_sum", "_count", "_created"), "summary": ("", "_sum", "_count", "_created")}
RATE_FUNCTIONS = {"rate", "irate", "increase"}
FUNCTIONS = RATE_FUNCTIONS | {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "histogram_quantile", "clamp_min",
    "clamp_max", "abs", "delta", "deriv", "max_over_time", "min_over_time", "avg_over_time", "absent", "vector",
    "label_values",
}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATOR_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
TOKEN = re.compile(r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<range>\[[^\]]*\])"""
                   r"""|(?P<number>\d+(?:\.\d+)?)|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>=~|!~|!=|==|>=|<=|.))""")


@dataclass
class Exported:
    """Sample name -> (family type, label names), over every process."""

    samples: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)

    def add(self, registry: CollectorRegistry) -> None:
        # prometheus_client has no public way to list a labelled metric's label names before it has children;
        # the delivery path's own families (dataplane.tallies) name theirs
        labels = {name: frozenset(getattr(collector, "labelnames", None) or getattr(collector, "_labelnames", ()))
                  for collector, names in registry._collector_to_names.items() for name in names}
        for family in registry.collect():
            for suffix in SAMPLE_SUFFIXES[family.type]:
                self.samples[family.name + suffix] = (
                    family.type, labels[family.name] | ({"le"} if suffix == "_bucket" else set()))


@pytest.fixture(scope="module")
def exported() -> Exported:
    """What the producer, the source (replaying in-process) and the consumer register, as they build it."""
    found = Exported()
    producer, source, consumer = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    Producer(ProducerSettings(), producer)
    Source(SourceSettings(health_port=0), registry=source)
    settings = ConsumerSettings()  # what the consumer's make_app builds
    sink.EventEndpoint(Replayer(settings, consumer), "/" + settings.stream, settings.body_memory_limit, consumer)
    for registry in (producer, source, consumer):
        found.add(registry)
    return found


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(container: dict) -> list[dict]:
    found = []
    for panel in container.get("panels", []):
        found += [panel, *panels(panel)]
    return found


def queries() -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) of every panel target and every query variable's series selector."""
    found = [(f"panel {panel['title']!r}", target["expr"], target.get("legendFormat", ""))
             for panel in panels(dashboard()) for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: label_values(<selector>, <label>) expected"
            found.append((f"variable {variable['name']!r}", match[1], "{{%s}}" % match[2]))
    return found


@dataclass
class Terms:
    metrics: list[str] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)
    rated: list[str] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)


def terms(expr: str) -> Terms:
    """The metric names, label names and functions a PromQL expression uses (strings and ranges skipped)."""
    tokens = [(m.lastgroup, m[m.lastgroup]) for m in TOKEN.finditer(expr) if m.lastgroup]
    found, braces, rating, i = Terms(), 0, False, 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "op":
            braces += {"{": 1, "}": -1}.get(text, 0)
        elif kind != "ident":
            pass
        elif braces:
            assert following in ("=", "!=", "=~", "!~"), f"{expr}: matcher expected after {text}"
            found.labels.add(text)
        elif text in LABEL_LIST_KEYWORDS:
            close = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
            found.labels |= {t for k, t in tokens[i + 2:close] if k == "ident"}
            i = close
        elif following == "(" or following in LABEL_LIST_KEYWORDS:  # sum(...), sum by (...) (...)
            found.functions.add(text)
            rating = text in RATE_FUNCTIONS
        elif text not in OPERATOR_KEYWORDS:
            found.metrics.append(text)
            if rating:
                found.rated.append(text)
                rating = False
        i += 1
    return found


def problems(expr: str, legend: str, exported: Exported) -> list[str]:
    used = terms(expr)
    errors = [f"unknown function {f}" for f in sorted(used.functions - FUNCTIONS)]
    if not used.metrics:
        errors.append("names no metric")
    known = [m for m in used.metrics if m in exported.samples]
    errors += [f"no process exports {m}" for m in used.metrics if m not in exported.samples]
    errors += [f"rate of the gauge {m}" for m in used.rated if m in known and exported.samples[m][0] == "gauge"]
    available = set().union(*(exported.samples[m][1] for m in known))
    wanted = used.labels | set(re.findall(r"{{\s*(\w+)\s*}}", legend))
    errors += [f"no label {label} on {', '.join(known)}" for label in sorted(wanted - available)]
    return errors


def test_every_query_names_metrics_and_labels_the_processes_export(exported):
    found = queries()
    assert len(found) >= 10
    errors = [f"{where}: {error} in {expr}" for where, expr, legend in found for error in problems(expr, legend, exported)]
    assert errors == []


@pytest.mark.parametrize("case", [
    {"expr": "sum(rate(async_producer_acepted_total[5m]))", "legend": "", "error": "no process exports async_producer_acepted_total"},
    {"expr": "sum(rate(async_producer_accepted[5m]))", "legend": "", "error": "no process exports async_producer_accepted"},
    {"expr": "sum(async_service_queued_total)", "legend": "", "error": "no process exports async_service_queued_total"},
    {"expr": 'max by (pod) (async_service_queued{service="x"})', "legend": "", "error": "no label pod"},
    {"expr": 'async_service_queued{servce="x"}', "legend": "", "error": "no label servce"},
    {"expr": "sum(rate(async_producer_rejected_total[5m]))", "legend": "{{reasn}}", "error": "no label reasn"},
    {"expr": "histogram_quantile(0.9, sum by (le) (rate(async_producer_batch_seconds[5m])))", "legend": "",
     "error": "no process exports async_producer_batch_seconds"},
    {"expr": "sum by (le) (async_producer_accepted_total)", "legend": "", "error": "no label le"},
    {"expr": "rate(async_service_in_flight[5m])", "legend": "", "error": "rate of the gauge async_service_in_flight"},
    {"expr": "sum(rate_of(async_producer_accepted_total[5m]))", "legend": "", "error": "unknown function rate_of"},
])
def test_the_check_refuses_what_would_draw_an_empty_panel(case, exported):
    assert case["error"] in " ".join(problems(case["expr"], case["legend"], exported))
    right = {"expr": "sum by (reason) (rate(async_producer_rejected_total[5m]))", "legend": "{{reason}}"}
    assert problems(right["expr"], right["legend"], exported) == []


def keda_queries() -> list[str]:
    (scaled,) = yaml.safe_load_all(SCALED_OBJECT.read_text())
    return [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]


def test_keda_scales_on_every_services_queue_as_the_source_exports_it(exported):
    (query,) = keda_queries()
    assert problems(query, "", exported) == []
    # every replica reports each Service's queue: max per Service, then the sum over Services
    assert {"async_service_queued", "async_service_in_flight"} <= set(terms(query).metrics)
    assert "max by (namespace, service) (async_service_queued)" in " ".join(query.split())


def test_the_dashboard_shows_queues_outcomes_the_producer_and_refusals():
    used = {m for _, expr, _ in queries() for m in terms(expr).metrics}
    assert {"async_service_queued", "async_service_oldest_queued_age_seconds", "async_service_in_flight",
            "async_service_outcomes_total", "async_producer_accepted_total", "async_producer_batch_seconds_bucket",
            "async_producer_rejected_total", "async_producer_queue_full_total"} <= used
    per_service = [expr for where, expr, _ in queries() if where.startswith("panel") and "async_service_" in expr]
    assert all('service=~"$service"' in expr for expr in per_service), "every per-Service panel follows the picker"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels(dashboard()):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])


def test_the_readme_lists_every_metric_the_processes_export(exported):
    readme = (ROOT / "component" / "config" / "README.md").read_text()
    section = readme.split("## Metrics and the dashboard", 1)[1].split("\n## ", 1)[0]
    scraped = {name for name in exported.samples
               if not name.endswith(("_created", "_bucket", "_sum", "_count"))}
    scraped |= {name.removesuffix("_bucket") for name in exported.samples if name.endswith("_bucket")}
    assert sorted(name for name in scraped if f"`{name}`" not in section) == []
