"""Run the Locust scenarios one after another and write the report.

By default it starts the local stack on free ports, runs each scenario headless
against its gateway, and stops the stack; ``--url`` aims at any gateway instead
(e.g. a kind cluster's, ``--url http://127.0.0.1:31080``). Results go to
``perf/results/<UTC timestamp>/``: Locust's CSVs and JSON per scenario, its log,
``report.md``, ``latency.png`` and ``throughput.png``.

    python perf/run.py [--users 20] [--duration 20] [--sleep 0] [--scenarios sync,follow]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import machine
import report
from async_component.cli import HelpFormatter

PERF = Path(__file__).resolve().parent
LOCUSTFILE = PERF / "locustfile.py"
RESULTS = PERF / "results"

SCENARIOS = {
    "sync": "SyncUser",
    "follow": "FollowAsyncUser",
    "conditional": "ConditionalAsyncUser",
    "always": "AlwaysAsyncUser",
}
"""Scenario -> Locust user class, in the default running order: the ones that flood the queue last."""


@dataclass
class Target:
    gateway_url: str
    conditional_host: str
    always_host: str
    redis_url: str | None = None
    stream: str = "async-requests"
    key_prefix: str = "async"
    description: str = ""


@contextlib.contextmanager
def target(args: argparse.Namespace) -> Iterator[Target]:
    if args.url:
        yield Target(args.url.rstrip("/"), f"helloworld-sleep.{args.domain}", f"helloworld-sleep-always.{args.domain}",
                     args.redis_url, description=args.url)
        return
    from async_component.local.stack import LocalStack
    from async_component.local.ports import free_port

    print("starting the local stack ...", file=sys.stderr, flush=True)
    with LocalStack(port=free_port(), sleep_seconds=0, producer_workers=args.producer_workers,
                    log_level="WARNING") as stack:
        yield Target(stack.gateway_url, stack.host("helloworld-sleep"), stack.host("helloworld-sleep-always"),
                     stack.redis_url, stack.stream, stack.key_prefix,
                     f"local stack (`async-component local`, producer workers: {args.producer_workers})")


def requests_so_far(history: Path) -> int:
    """Total requests in the last "Aggregated" row of Locust's history CSV (0 before the first)."""
    try:
        rows = list(csv.DictReader(history.open()))
    except OSError:
        return 0
    totals = [int(row["Total Request Count"]) for row in rows if row.get("Name") == "Aggregated"]
    return totals[-1] if totals else 0


def status(line: str, tick: int, final: bool = False) -> None:
    """A progress line: rewritten in place on a terminal, every 5th one printed in a log."""
    if sys.stderr.isatty():
        print(f"\r{line}\033[K", end="\n" if final else "", file=sys.stderr, flush=True)
    elif final or tick % 5 == 0:
        print(line, file=sys.stderr, flush=True)


def run_scenario(args: argparse.Namespace, where: Target, folder: Path, scenario: str, position: str) -> int:
    prefix = folder / scenario
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), SCENARIOS[scenario], "--headless",
            "-u", str(args.users), "-r", str(args.spawn_rate or args.users), "-t", f"{args.duration}s",
            "--stop-timeout", "5", "--host", where.gateway_url, "--csv", str(prefix), "--csv-full-history",
            "--only-summary", "--json-file", str(prefix)]
    env = {**os.environ, "PERF_SLEEP": f"{args.sleep:g}", "PERF_POLL": f"{args.poll:g}",
           "PERF_HOST_CONDITIONAL": where.conditional_host, "PERF_HOST_ALWAYS": where.always_host}
    started = time.monotonic()
    with open(f"{prefix}.log", "w") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        ticks = 0
        while process.poll() is None:
            elapsed = time.monotonic() - started
            count = requests_so_far(Path(f"{prefix}_stats_history.csv"))
            status(f"{position} {scenario}: {min(elapsed, args.duration):3.0f}/{args.duration} s, "
                   f"{args.users} users, {count:,} requests", ticks)
            ticks += 1
            time.sleep(1.0)
    if not Path(f"{prefix}.json").exists():
        raise SystemExit(f"locust wrote no results for {scenario} (exit code {process.returncode}); see {prefix}.log")
    total = sum(entry.requests for entry in report.load_entries(Path(f"{prefix}.json"), scenario))
    status(f"{position} {scenario}: done, {total:,} requests", 0, final=True)
    return process.returncode


def backlog_note(scenario: str, backlog: int, waited: float, left: int, *, last: bool) -> str:
    """What the report says about the requests a scenario left queued, and what came after them."""
    after = "the run ended" if last else "the next scenario started"
    text = f"{scenario} left {backlog:,} requests queued; {after} after {waited:.0f} s of waiting for them"
    return text + (f", with {left:,} still queued" if left else "")


def wait_for_backlog(where: Target, timeout: float) -> tuple[int, float, int] | None:
    """Wait until the queue is empty so the next scenario starts clean.

    Returns (backlog at the start, seconds waited, backlog left), or None without Redis."""
    if not where.redis_url:
        return None
    import redis

    from async_component.dataplane.queues import Layout

    client = redis.Redis.from_url(where.redis_url)
    layout = Layout(where.key_prefix, where.stream)
    try:
        def backlog() -> int:
            """Every queue that may hold work (the active set), and the single stream."""
            queues = [layout.single] + [layout.member(m.decode()) for m in client.zrange(layout.active, 0, -1)]
            return sum(sum(client.xlen(s) for s in queue.streams) + client.zcard(queue.retries) for queue in queues)

        first, started, tick = backlog(), time.monotonic(), 0
        while (left := backlog()) > 0 and time.monotonic() - started < timeout:
            status(f"  waiting for the queue to drain: {left:,} left", tick)
            tick += 1
            time.sleep(0.5)
        if first:
            status(f"  queue drained: {first - left:,} of {first:,} requests in {time.monotonic() - started:.0f} s",
                   0, final=True)
        return first, time.monotonic() - started, left
    finally:
        client.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Locust: sync versus async calls of the sample app, with a report.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--url", help="gateway to load (default: start the local stack); e.g. http://127.0.0.1:31080")
    parser.add_argument("--domain", default="default.example.com", help="domain of the sample Services' hosts with --url")
    parser.add_argument("--redis-url", help="with --url: the stack's Redis, to wait for the queue between scenarios")
    parser.add_argument("--users", type=int, default=20, help="concurrent Locust users per scenario")
    parser.add_argument("--spawn-rate", type=float, default=0, help="users started per second (default: all at once)")
    parser.add_argument("--duration", type=int, default=20, help="seconds per scenario")
    parser.add_argument("--sleep", type=float, default=0.0, help="the app's sleep per request, seconds")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between polls of a Location")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--producer-workers", type=int, default=1, help="producer processes of the local stack")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="longest wait for the queue between scenarios")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where <timestamp>/ goes")
    parser.add_argument("--quiet-load", type=float, default=0,
                        help="first wait (up to 10 min) until the 1-minute load average is below this; 0: start at once")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        parser.error(f"unknown scenario(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(SCENARIOS)}")
    if args.users < 1 or args.duration < 1:
        parser.error("--users and --duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quiet_load:
        machine.wait_for_quiet(args.quiet_load, 600)
    started = machine.utc_now()
    folder = args.results / machine.stamp(started)
    folder.mkdir(parents=True, exist_ok=True)
    facts = machine.facts(started)
    notes: list[str] = []
    failed: list[str] = []
    with target(args) as where:
        for number, scenario in enumerate(args.scenarios, 1):
            if run_scenario(args, where, folder, scenario, f"[{number}/{len(args.scenarios)}]") != 0:
                failed.append(scenario)
            drained = wait_for_backlog(where, args.drain_timeout)
            if drained and drained[0]:
                notes.append(backlog_note(scenario, *drained, last=number == len(args.scenarios)))
    facts.update({
        "target": where.description,
        "users": f"{args.users} per scenario, spawned {'at once' if not args.spawn_rate else f'{args.spawn_rate:g}/s'}, "
                 f"no wait between tasks",
        "duration": f"{args.duration} s per scenario, one scenario at a time",
        "app sleep": f"{args.sleep:g} s per request; Location polled every {args.poll * 1000:g} ms",
        "load after the run (this run included)": machine.load(),
        "command": "python perf/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
    })
    if failed:
        notes.append(f"Locust counted failed requests in: {', '.join(failed)} (see the failures CSVs)")
    notes.append("latencies are Locust's, in whole milliseconds below 100 ms; req/s vs sync compares throughput "
                 "with the sync scenario's; \"completed\" runs from the 202 to the final answer of the Location")
    path = report.write_report(folder, args.scenarios, "Sync versus async calls (Locust)", facts, notes)
    print(path.read_text())
    print(f"results: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
