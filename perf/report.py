"""Turn Locust's results into the perf report: a markdown table and two PNG charts.

Pure functions over files: nothing here talks to the network, so the report can be
rebuilt from a results folder and tested on small synthetic files. The summary is
read from Locust's ``--json-file`` output rather than ``_stats.csv``, because Locust
rewrites the CSV only once a second while it runs and not when it stops, so the
CSV can miss the last second; the JSON is written at shutdown with the final
counts, the response-time histogram and the requests of every second.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

PERCENTILES = (0.50, 0.95, 0.99)
SYNC_SCENARIO = "sync"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Locust stats entry (a request name) of one scenario's run."""

    scenario: str
    name: str
    method: str
    requests: int
    failures: int
    started: float
    last_request: float
    response_times: Mapping[float, int]
    """Locust's histogram: response time in ms (rounded as Locust rounds) -> count."""
    per_second: Mapping[int, int]
    """Unix second -> requests completed in it."""

    @property
    def duration(self) -> float:
        return max(self.last_request - self.started, 0.0)

    @property
    def throughput(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        return percentile(self.response_times, fraction)


def percentile(histogram: Mapping[float, int], fraction: float) -> float:
    """Nearest-rank percentile of a value -> count histogram (nan when empty)."""
    total = sum(histogram.values())
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    return max(histogram)


def load_entries(path: Path, scenario: str) -> list[Entry]:
    """The entries of one Locust ``--json-file``."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected Locust's JSON list of stats entries")
    return [
        Entry(
            scenario=scenario,
            name=row["name"],
            method=row["method"],
            requests=int(row["num_requests"]),
            failures=int(row["num_failures"]),
            started=float(row["start_time"]),
            last_request=float(row["last_request_timestamp"] or row["start_time"]),
            response_times={float(k): int(v) for k, v in row["response_times"].items()},
            per_second={int(float(k)): int(v) for k, v in row["num_reqs_per_sec"].items()},
        )
        for row in rows
    ]


def load_results(folder: Path, scenarios: Iterable[str]) -> list[Entry]:
    """Entries of every scenario whose ``<scenario>.json`` is in ``folder``, in the given order."""
    entries: list[Entry] = []
    for scenario in scenarios:
        path = Path(folder) / f"{scenario}.json"
        if path.exists():
            entries.extend(load_entries(path, scenario))
    return entries


# --- the table


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")


def _ratio(value: float, baseline: float) -> str:
    if math.isnan(value) or math.isnan(baseline) or baseline <= 0 or value <= 0:
        return "-"
    return f"{value / baseline:.2f}x"


def markdown_table(entries: Sequence[Entry]) -> str:
    """p50/p95/p99 and throughput per entry, each scenario next to the sync baseline."""
    sync = next((e for e in entries if e.scenario == SYNC_SCENARIO), None)
    header = ("| scenario | request | requests | failures | req/s | p50 ms | p95 ms | p99 ms "
              "| p50 vs sync | req/s vs sync |")
    lines = [header, "|" + "---|" * 4 + "---:|" * 6]
    for e in entries:
        p50, p95, p99 = (e.percentile(q) for q in PERCENTILES)
        lines.append(
            f"| {e.scenario} | {e.name} | {e.requests} | {e.failures} | {e.throughput:.0f} "
            f"| {_ms(p50)} | {_ms(p95)} | {_ms(p99)} "
            f"| {_ratio(p50, sync.percentile(0.5)) if sync else '-'} "
            f"| {_ratio(e.throughput, sync.throughput) if sync else '-'} |"
        )
    return "\n".join(lines) + "\n"


def report_markdown(title: str, facts: Mapping[str, str], entries: Sequence[Entry],
                    charts: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """The whole ``report.md``: facts of the run, the table, the charts, notes."""
    parts = [f"# {title}", ""]
    parts += [f"- **{key}**: {value}" for key, value in facts.items()]
    parts += ["", markdown_table(entries)]
    parts += [f"![{caption}]({name})\n" for caption, name in charts.items()]
    if notes:
        parts += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(parts)


# --- the charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(entry: Entry, separator: str) -> str:
    return entry.name if entry.scenario in entry.name else f"{entry.scenario}{separator}{entry.name}"


def latency_chart(entries: Sequence[Entry], path: Path) -> Path:
    """Horizontal bars of p50/p95/p99 per entry (log scale when they span two decades)."""
    plt = _pyplot()
    shown = [e for e in entries if e.requests]
    labels = [label(e, "\n") for e in shown]
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.75 * max(len(shown), 1)))
    height = 0.25
    values_seen: list[float] = []
    for i, fraction in enumerate(PERCENTILES):
        values = [max(e.percentile(fraction), 0.1) for e in shown]
        values_seen += values
        ax.barh([n + (i - 1) * height for n in range(len(shown))], values, height,
                label=f"p{fraction * 100:g}")
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    if values_seen and max(values_seen) / min(values_seen) > 100:
        ax.set_xscale("log")
    ax.set_xlabel("response time (ms)")
    ax.set_title("Latency percentiles per scenario")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


SMOOTHING_SECONDS = 3
"""Width of the centred moving average drawn in the throughput chart."""


def throughput_series(entry: Entry) -> tuple[list[int], list[int]]:
    """Seconds since the scenario started and requests completed in each (gaps are zeros)."""
    if not entry.per_second:
        return [], []
    first = int(entry.started)
    last = max(entry.per_second)
    seconds = list(range(first, last + 1))
    return [s - first for s in seconds], [entry.per_second.get(s, 0) for s in seconds]


def whole_seconds(entry: Entry) -> tuple[list[int], list[int]]:
    """:func:`throughput_series` without its first and last second, which the run only partly covers."""
    xs, ys = throughput_series(entry)
    return xs[1:-1], ys[1:-1]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average; near the ends it averages the values there are."""
    half = window // 2
    windows = (values[max(0, i - half):i + half + 1] for i in range(len(values)))
    return [sum(around) / len(around) for around in windows]


def throughput_panels(entries: Sequence[Entry]) -> list[tuple[str, list[Entry]]]:
    """One panel per async scenario, each with the sync run beside it (the sync run alone without any)."""
    sync = [e for e in entries if e.scenario == SYNC_SCENARIO]
    others: dict[str, list[Entry]] = {}
    for e in entries:
        if e.scenario != SYNC_SCENARIO:
            others.setdefault(e.scenario, []).append(e)
    if not others:
        return [(SYNC_SCENARIO, sync)] if sync else []
    return [(f"{scenario} vs {SYNC_SCENARIO}" if sync else scenario, sync + group)
            for scenario, group in others.items()]


def throughput_chart(entries: Sequence[Entry], path: Path) -> Path:
    """Requests per second over time: a panel per async scenario next to the sync run, on one scale.

    Locust counts the requests of each wall-clock second; the first and last seconds of a
    run are partial and left out, and a moving average takes out the second-to-second noise."""
    plt = _pyplot()
    panels = throughput_panels([e for e in entries if e.per_second]) or [("no requests", [])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.6 + 2.2 * len(panels)), sharex=True, sharey=True,
                             squeeze=False)
    styles = ("-", "--", ":")
    for ax, (title, shown) in zip(axes[:, 0], panels):
        drawn = 0
        for e in shown:
            xs, ys = whole_seconds(e)
            if not xs:
                continue
            if e.scenario == SYNC_SCENARIO:  # the reference, in grey
                style = {"color": "0.55", "linewidth": 1.5}
            else:
                style = {"color": f"C{drawn}", "linestyle": styles[drawn % len(styles)], "linewidth": 1.8}
                drawn += 1
            ax.plot(xs, moving_average(ys, SMOOTHING_SECONDS), label=label(e, ": "), **style)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("requests/s", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("seconds since the scenario started")
    fig.suptitle(f"Throughput over time ({SMOOTHING_SECONDS} s moving average, partial first and last seconds "
                 f"left out)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def write_report(folder: Path, scenarios: Sequence[str], title: str, facts: Mapping[str, str],
                 notes: Sequence[str] = ()) -> Path:
    """Read ``<scenario>.json`` files in ``folder``, write the charts and ``report.md`` there."""
    folder = Path(folder)
    entries = load_results(folder, scenarios)
    if not entries:
        raise ValueError(f"{folder}: no Locust results for {', '.join(scenarios)}")
    charts = {
        "latency percentiles": latency_chart(entries, folder / "latency.png").name,
        "throughput over time": throughput_chart(entries, folder / "throughput.png").name,
    }
    path = folder / "report.md"
    path.write_text(report_markdown(title, facts, entries, charts, notes))
    return path
