"""The perf and bench reports, built from small synthetic Locust results and figures."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[2] / "perf"


def load(name: str):
    """A module of perf/ (scripts, not a package), by file path."""
    spec = importlib.util.spec_from_file_location(f"perf_{name}", PERF / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report, figures, wrk = load("report"), load("figures"), load("wrk")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def locust_row(name, method="GET", histogram=None, per_second=None, start=1000.0, last=1010.0, failures=0):
    """One stats entry as Locust's ``--json-file`` writes it."""
    histogram = histogram or {}
    return {
        "name": name, "method": method, "start_time": start, "last_request_timestamp": last,
        "num_requests": sum(histogram.values()), "num_none_requests": 0, "num_failures": failures,
        "total_response_time": sum(float(k) * v for k, v in histogram.items()),
        "max_response_time": max(map(float, histogram), default=0), "min_response_time": 0,
        "total_content_length": 0,
        "response_times": {str(k): v for k, v in histogram.items()},
        "num_reqs_per_sec": {str(k): v for k, v in (per_second or {}).items()},
        "num_fail_per_sec": {},
    }


def write_run(folder: Path, scenario: str, *rows) -> None:
    (folder / f"{scenario}.json").write_text(json.dumps(list(rows)))


def test_percentiles_are_nearest_rank_over_the_histogram():
    histogram = {1: 50, 2: 45, 10: 4, 100: 1}
    assert report.percentile(histogram, 0.50) == 1
    assert report.percentile(histogram, 0.95) == 2
    assert report.percentile(histogram, 0.99) == 10
    assert report.percentile(histogram, 1.0) == 100
    assert math.isnan(report.percentile({}, 0.5))


def test_entries_carry_locust_counts_and_throughput(tmp_path):
    write_run(tmp_path, "sync", locust_row("sync", histogram={20: 90, 30: 10}, start=1000.0, last=1010.0, failures=3))
    [entry] = report.load_entries(tmp_path / "sync.json", "sync")
    assert (entry.scenario, entry.name, entry.requests, entry.failures) == ("sync", "sync", 100, 3)
    assert entry.throughput == pytest.approx(10.0)
    assert entry.percentile(0.5) == 20 and entry.percentile(0.99) == 30


def test_missing_scenarios_are_left_out_and_order_is_kept(tmp_path):
    write_run(tmp_path, "follow", locust_row("async follow: accepted", histogram={2: 1}))
    write_run(tmp_path, "sync", locust_row("sync", histogram={20: 1}))
    entries = report.load_results(tmp_path, ["sync", "conditional", "follow"])
    assert [e.scenario for e in entries] == ["sync", "follow"]


def test_table_puts_async_next_to_the_sync_baseline(tmp_path):
    write_run(tmp_path, "sync", locust_row("sync", histogram={20: 100}, start=0, last=10))
    write_run(tmp_path, "always", locust_row("async always: accepted", histogram={2: 400}, start=0, last=10))
    table = report.markdown_table(report.load_results(tmp_path, ["sync", "always"]))
    lines = table.splitlines()
    assert lines[0].startswith("| scenario | request | requests | failures | req/s | p50 ms | p95 ms | p99 ms")
    assert lines[2] == "| sync | sync | 100 | 0 | 10 | 20 | 20 | 20 | 1.00x | 1.00x |"
    assert lines[3] == "| always | async always: accepted | 400 | 0 | 40 | 2 | 2 | 2 | 0.10x | 4.00x |"


def test_table_without_a_sync_run_has_no_ratios(tmp_path):
    write_run(tmp_path, "always", locust_row("async always: accepted", histogram={0.4: 3}, start=0, last=1))
    [line] = report.markdown_table(report.load_results(tmp_path, ["always"])).splitlines()[2:]
    assert line == "| always | async always: accepted | 3 | 0 | 3 | 0.4 | 0.4 | 0.4 | - | - |"


def test_throughput_series_fills_quiet_seconds_with_zeros(tmp_path):
    write_run(tmp_path, "sync", locust_row("sync", histogram={5: 7}, per_second={1000: 3, 1003: 4}, start=1000.2))
    [entry] = report.load_results(tmp_path, ["sync"])
    assert report.throughput_series(entry) == ([0, 1, 2, 3], [3, 0, 0, 4])


def test_throughput_chart_leaves_out_the_partial_first_and_last_seconds(tmp_path):
    per_second = {1000: 3, 1001: 40, 1002: 0, 1003: 44, 1004: 9}
    write_run(tmp_path, "sync", locust_row("sync", histogram={5: 96}, per_second=per_second, start=1000.7))
    [entry] = report.load_results(tmp_path, ["sync"])
    assert report.whole_seconds(entry) == ([1, 2, 3], [40, 0, 44])


def test_rates_are_smoothed_with_a_centred_moving_average():
    assert report.moving_average([0, 10, 20, 60], 3) == [5, 10, 30, 40]
    assert report.moving_average([7], 3) == [7]


def test_throughput_chart_has_one_panel_per_async_scenario_beside_sync(tmp_path):
    write_run(tmp_path, "sync", locust_row("sync", histogram={5: 1}))
    write_run(tmp_path, "follow", locust_row("async follow: accepted", histogram={1: 1}),
              locust_row("async follow: completed", "ASYNC", histogram={9: 1}))
    write_run(tmp_path, "always", locust_row("async always: accepted", histogram={1: 1}))
    panels = report.throughput_panels(report.load_results(tmp_path, ["sync", "follow", "always"]))
    assert [(title, [e.name for e in shown]) for title, shown in panels] == [
        ("follow vs sync", ["sync", "async follow: accepted", "async follow: completed"]),
        ("always vs sync", ["sync", "async always: accepted"]),
    ]
    assert [title for title, _ in report.throughput_panels(report.load_results(tmp_path, ["always"]))] == ["always"]
    assert [title for title, _ in report.throughput_panels(report.load_results(tmp_path, ["sync"]))] == ["sync"]


def test_report_writes_markdown_and_both_charts(tmp_path):
    write_run(tmp_path, "sync", locust_row("sync", histogram={20: 50, 25: 50}, per_second={1000: 50, 1001: 50}))
    write_run(
        tmp_path, "follow",
        locust_row("async follow: accepted", histogram={1: 60}, per_second={1000: 30, 1001: 30}),
        locust_row("async follow: completed", "ASYNC", histogram={40: 58, 900: 2}, per_second={1000: 29, 1001: 31}),
    )
    path = report.write_report(tmp_path, ["sync", "follow"], "Sync versus async",
                               {"users": "20", "machine": "2 cores"}, notes=["app sleep 0 s"])
    text = path.read_text()
    assert text.startswith("# Sync versus async\n")
    assert "- **users**: 20" in text and "- app sleep 0 s" in text
    assert "| follow | async follow: completed | 60 | 0 |" in text
    for name in ("latency.png", "throughput.png"):
        assert f"]({name})" in text
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_report_without_results_says_so(tmp_path):
    with pytest.raises(ValueError, match="no Locust results"):
        report.write_report(tmp_path, ["sync"], "t", {})


# --- the bench table


def test_bench_table_shows_value_reference_ratio_and_verdict():
    rows = [
        figures.Figure("1 producer, 1 worker", "throughput", 12345.6, "req/s", "bare 15,000 req/s", 0.823,
                       ">= 0.8 x bare", True),
        figures.Figure("1 producer, 1 worker", "p99 latency", 12.345, "ms", "bare 8 ms", None, "<= 10 ms", False),
        figures.Figure("4 storage", "Redis bytes per request", 1400, "B", "1 KiB body", 1.367, "<= 1,536 B", True),
        figures.Figure("3 added latency", "median async", 3.5, "ms"),
    ]
    lines = figures.markdown_table(rows).splitlines()
    assert lines[2] == "| 1 producer, 1 worker | throughput | 12,346 req/s | bare 15,000 req/s | 0.82 | >= 0.8 x bare | yes |"
    assert lines[3] == "| 1 producer, 1 worker | p99 latency | 12.3 ms | bare 8 ms |  | <= 10 ms | **no** |"
    assert lines[4] == "| 4 storage | Redis bytes per request | 1,400 B | 1 KiB body | 1.37 | <= 1,536 B | yes |"
    assert lines[5] == "| 3 added latency | median async | 3.50 ms |  |  |  |  |"
    assert figures.summary_line(rows) == "2 of 3 targets met; MISSED: 1 producer, 1 worker: p99 latency"


def test_bench_json_keeps_every_figure_and_the_facts():
    rows = [figures.Figure("2 drain", "rate", 900.0, "req/s", "sync 1,000 req/s", 0.9, ">= 0.5 x sync", True)]
    doc = json.loads(figures.to_json(rows, {"load before the run": "0.10"}))
    assert doc["facts"] == {"load before the run": "0.10"}
    assert doc["figures"][0]["value"] == 900.0 and doc["figures"][0]["met"] is True


def test_a_missing_measurement_never_meets_a_target():
    assert not figures.at_least(math.nan, 0.5) and not figures.at_most(math.nan, 5)
    assert figures.at_least(0.5, 0.5) and figures.at_most(5, 5)
    assert math.isnan(figures.ratio(10, 0))


def test_wrk_summary_line_is_read_with_errors_added_up():
    output = ("Running 15s test @ http://127.0.0.1:1/\n"
              'WRK_JSON {"requests":30000,"duration_us":15000000,"bytes":1,"connect_errors":1,"read_errors":2,'
              '"write_errors":0,"status_errors":3,"timeouts":4,"mean_us":2000.5,"p50_us":1500,"p90_us":3000,'
              '"p99_us":9000,"p999_us":12000,"max_us":20000}\n')
    result = wrk.parse(output)
    assert result.rate == 2000 and result.errors == 10
    assert (result.p50_ms, result.p99_ms, result.max_ms) == (1.5, 9.0, 20.0)
    with pytest.raises(wrk.WrkError, match="no summary line"):
        wrk.parse("unable to connect")


def test_wrk_only_loads_loopback():
    with pytest.raises(wrk.WrkError, match="only target 127.0.0.1"):
        wrk.run("http://10.0.0.1:80/", seconds=1)


def test_wrk_rounds_combine_into_one_rate_with_median_percentiles():
    rounds = [wrk.WrkResult(1000, 1.0, 0, 2.0, 9.0, 30.0), wrk.WrkResult(3000, 1.0, 1, 1.0, 5.0, 10.0),
              wrk.WrkResult(2000, 1.0, 0, 3.0, 7.0, 12.0)]
    combined = wrk.combine(rounds)
    assert combined.rate == 2000 and combined.errors == 1
    assert (combined.p50_ms, combined.p99_ms, combined.max_ms) == (2.0, 7.0, 30.0)


def test_a_missed_target_is_shouted_and_fails_the_run():
    met = figures.Figure("2 drain", "rate", 900.0, "req/s", target=">= 0.5 x sync", met=True)
    context = figures.Figure("2 drain", "rate via the consumer", 700.0, "req/s")
    miss = figures.Figure("3 added latency", "median", 7.0, "ms", target="<= 5 ms", met=False)
    assert figures.exit_status([met, context]) == 0
    assert figures.exit_status([met, context, miss]) == 1
    assert figures.summary_line([met, context, miss]) == "1 of 2 targets met; MISSED: 3 added latency: median"


# --- the scripts, without running a benchmark or Locust


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))  # the scripts import their neighbours by name
    monkeypatch.setenv("COLUMNS", "200")
    return load("bench"), load("run")


@pytest.mark.parametrize("met, code", [(True, 0), (False, 1)])
def test_bench_exits_non_zero_when_a_target_is_missed(scripts, monkeypatch, tmp_path, capsys, met, code):
    bench, _ = scripts
    found = [figures.Figure("4 storage", "Redis bytes per request", 1400, "B", target="<= 1,536 B", met=True),
             figures.Figure("3 added latency", "median", 4.0, "ms", target="<= 5 ms", met=met)]
    monkeypatch.setattr(bench, "run", lambda args: (found, []))
    assert bench.main(["--only", "3,4", "--results", str(tmp_path)]) == code
    out, err = capsys.readouterr()
    [folder] = tmp_path.iterdir()
    assert (folder / "bench.md").exists() and (folder / "bench.json").exists(), "results are written either way"
    if met:
        assert "2 of 2 targets met" in out and "MISSED" not in out + err
    else:
        assert "1 of 2 targets met; MISSED: 3 added latency: median" in out
        assert err.splitlines()[-1].startswith("bench: MISSED 1 target(s)")


def test_the_judged_drain_is_the_median_stacks_and_every_stack_is_noted(scripts):
    bench, _ = scripts
    draws = [(4000.0, 3200.0, [], 120.0), (4000.0, 2600.0, [], 140.0), (4000.0, 3000.0, [], 130.0)]
    sync, drained, source_us, note = bench.median_draw(draws)
    assert (sync, drained, source_us) == (4000.0, 3000.0, 130.0)
    assert "0.80 (3,200 / 4,000 req/s, source 120 µs), 0.65 (2,600" in note and "0.75 (3,000" in note


def test_the_quiet_app_drain_is_the_median_quiet_stacks_unjudged(scripts):
    bench, _ = scripts
    draws = [(5000.0, 3500.0, ["a"], 120.0), (5000.0, 4500.0, ["b"], 100.0), (5000.0, 4000.0, ["c"], 110.0)]
    [figure], notes = bench.quiet_app_drain(draws, 5000)
    assert (figure.value, figure.ratio, figure.met) == (4000.0, 0.8, None) and not figure.target
    assert notes[:3] == ["quiet stack 1: 2 (the app quiet): a", "quiet stack 2: 2 (the app quiet): b",
                         "quiet stack 3: 2 (the app quiet): c"]
    assert notes[3].startswith("2 (the app quiet): drain / sync in 3 fresh stacks, in the order run: 0.70 (3,500")


@pytest.mark.parametrize("script, option, shown", [
    (0, "--seconds", "(default: 15.0)"), (0, "--workers", "(default: 1,2)"), (0, "--quiet-load", "(default: 0)"),
    (1, "--users", "(default: 20)"), (1, "--spawn-rate", "(default: all at once)"),
])
def test_perf_scripts_help_states_each_default_once(scripts, capsys, script, option, shown):
    with pytest.raises(SystemExit):
        scripts[script].parse_args(["--help"])
    blocks = re.split(r"\n  (?=-)", capsys.readouterr().out)
    [block] = [" ".join(block.split()) for block in blocks if block.startswith(option + " ")]
    assert block.endswith(shown) and block.count("default") == 1


def test_the_last_scenario_backlog_note_says_the_run_ended(scripts):
    _, run = scripts
    assert run.backlog_note("conditional", 3656, 2.2, 0, last=False) == (
        "conditional left 3,656 requests queued; the next scenario started after 2 s of waiting for them")
    assert run.backlog_note("always", 4068, 2.4, 0, last=True) == (
        "always left 4,068 requests queued; the run ended after 2 s of waiting for them")
    assert run.backlog_note("always", 4068, 120, 9, last=True).endswith("waiting for them, with 9 still queued")
