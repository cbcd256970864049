"""The component benchmarks' results: figures with their reference, ratio and target.

Pure: ``bench.py`` measures, this formats (a markdown table and a JSON document),
so the table's shape is tested without running a benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Figure:
    bench: str
    """Which benchmark, e.g. ``1 producer, 2 workers``."""
    name: str
    value: float
    unit: str
    reference: str = ""
    """What the value is compared with, in words and numbers."""
    ratio: float | None = None
    """value / reference value, when the comparison is a ratio."""
    target: str = ""
    met: bool | None = None
    """None: the figure is context for another one, not judged on its own."""


def fmt_value(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit in ("req/s", "B", "requests"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:.2f} ms" if abs(value) < 10 else f"{value:.1f} ms"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:g} {unit}".strip()


def verdict(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: ""}[met]


def markdown_table(figures: Sequence[Figure]) -> str:
    lines = ["| bench | figure | measured | reference | ratio | target | met |", "|---|---|---:|---|---:|---|---|"]
    for f in figures:
        ratio = "" if f.ratio is None or math.isnan(f.ratio) else f"{f.ratio:.2f}"
        lines.append(f"| {f.bench} | {f.name} | {fmt_value(f.value, f.unit)} | {f.reference} | {ratio} "
                     f"| {f.target} | {verdict(f.met)} |")
    return "\n".join(lines) + "\n"


def missed(figures: Sequence[Figure]) -> list[Figure]:
    return [f for f in figures if f.met is False]


def summary_line(figures: Sequence[Figure]) -> str:
    judged = [f for f in figures if f.met is not None]
    misses = [f"{f.bench}: {f.name}" for f in missed(figures)]
    text = f"{len(judged) - len(misses)} of {len(judged)} targets met"
    return text + (f"; MISSED: {'; '.join(misses)}" if misses else "")


def exit_status(figures: Sequence[Figure]) -> int:
    """1 when a target was missed, so ``tox -e bench`` (and a script around it) fails; 0 otherwise."""
    return 1 if missed(figures) else 0


def to_json(figures: Sequence[Figure], facts: Mapping[str, object]) -> str:
    return json.dumps({"facts": dict(facts), "figures": [dataclasses.asdict(f) for f in figures]}, indent=2)


def report_markdown(title: str, facts: Mapping[str, object], figures: Sequence[Figure],
                    notes: Sequence[str] = ()) -> str:
    parts = [f"# {title}", ""]
    parts += [f"- **{key}**: {value}" for key, value in facts.items()]
    parts += ["", markdown_table(figures), summary_line(figures) + ".", ""]
    if notes:
        parts += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(parts)


def at_least(value: float, floor: float) -> bool:
    return not math.isnan(value) and value >= floor


def at_most(value: float, ceiling: float) -> bool:
    return not math.isnan(value) and value <= ceiling


def ratio(value: float, reference: float) -> float:
    return value / reference if reference and not math.isnan(reference) else math.nan
