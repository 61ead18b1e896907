"""python -m benchmarks [--only SECTIONS] [--n N] [--rounds R] [--peer-n N] [--backends ...] [--json PATH].

Per backend, in one process run: our publish (async, sync facade, publish_many), drain at concurrency 1, 16
and 128, publish-to-start latency, each beside its raw-driver baseline; then the peers installed (each in a
subprocess, see benchmarks/peers.py); then idle consumer CPU and resident memory per queued job; then the job
lifecycle (benchmarks/lifecycle.py: finish -> waiter wakes, status lookups, cancel -> run, drain with and
without records, Redis memory per retained result). ``--only`` runs some sections: facade, core, peers,
resources, lifecycle, hooks (the drain with the PrometheusHook beside the hook-free drain), delays (how late
1,000 delayed jobs with random delays of 0.1-5 s start, per backend), schedules (3 scheduler processes fire an
every=1s schedule for 10 s: fires, repeats, lateness; on RabbitMQ the leader is SIGKILLed). Throughput pairs
that make a target ratio are measured side by side: ``--rounds``
interleaved rounds of ``n / rounds`` jobs each, best round kept on both sides, so that a noisy neighbour skews
both alike; each peer also runs ``--rounds`` times and keeps its best. Prints the table, then every target
with its measured figure, and writes all of it as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks import delays, facade, hooks, lifecycle, ours, peers, raw, resources, schedules
from benchmarks.harness import Report, best_of, machine, percentile
from mindtrace.jobs import LocalClient, from_url
from mindtrace.jobs.backends.base import Backend

PUBLISH = "publish single (async)"
PUBLISH_SYNC = "publish single (sync facade)"
PUBLISH_MANY = "publish_many (batch 500)"
PEER_PUBLISH = "publish single"
CONCURRENCIES = (1, 16, 128)
#: The drain each backend is compared with peers at: ours is fastest at 1 in memory; brokers need 16.
PEER_CONCURRENCY = {"memory": 1, "redis": 16, "rabbitmq": 16}
SECTIONS = ("facade", "core", "peers", "resources", "lifecycle", "hooks", "delays", "schedules")
RAW_NOTES = {
    "memory": ("PriorityQueue.put", None, "PriorityQueue.get", 1, "put -> get"),
    "redis": ("LPUSH", "pipelined LPUSH", "BRPOP", 1, "LPUSH -> blocked BRPOP"),
    "rabbitmq": ("confirmed publish", "batched confirms", "consume + ack, prefetch 16", 16, "publish -> consume"),
}


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=1):
            return True
    except OSError:
        return False


def _raw_for(name: str, url: str) -> Any:
    if name == "memory":
        return raw.RawMemory()
    if name == "redis":
        return raw.RawRedis(url)
    return raw.RawRabbitMQ(url)


async def run_backend(report: Report, name: str, factory: Callable[[], Backend], url: str, args: Any) -> None:
    """Ours and the raw driver, side by side, on one backend."""
    per = max(1, args.n // args.rounds)
    publish_note, many_note, drain_note, raw_concurrency, latency_note = RAW_NOTES[name]
    baseline = _raw_for(name, url)
    try:
        best = await best_of(
            args.rounds,
            {
                "ours": lambda: ours.publish_async(factory, per),
                "sync": lambda: asyncio.to_thread(ours.publish_sync, factory, per),
                "raw": lambda: baseline.publish_single(per),
            },
        )
        report.add(name, PUBLISH, "ours", best["ours"], "jobs/s")
        report.add(name, PUBLISH_SYNC, "ours", best["sync"], "jobs/s", "one thread")
        report.add(name, PUBLISH, "raw", best["raw"], "jobs/s", publish_note)

        measures: dict[str, Callable[[], Awaitable[float]]] = {"ours": lambda: ours.publish_many(factory, per)}
        if many_note:
            measures["raw"] = lambda: baseline.publish_many(per, 500)
        best = await best_of(args.rounds, measures)
        report.add(name, PUBLISH_MANY, "ours", best["ours"], "jobs/s")
        if many_note:
            report.add(name, PUBLISH_MANY, "raw", best["raw"], "jobs/s", many_note)

        for concurrency in CONCURRENCIES:

            def drain(c: int = concurrency) -> Awaitable[float]:
                return ours.drain(factory, per, c)

            measures = {"ours": drain}
            if concurrency == raw_concurrency:
                measures["raw"] = lambda: baseline.drain(per, raw_concurrency)
            best = await best_of(args.rounds, measures)
            report.add(name, f"drain c={concurrency}", "ours", best["ours"], "jobs/s")
            if "raw" in best:
                report.add(name, f"drain c={concurrency}", "raw", best["raw"], "jobs/s", drain_note)

        samples = await ours.latency(factory, args.latency_n)
        raw_samples = await baseline.latency(args.latency_n)
        for q in (50, 99):
            report.add(name, f"latency p{q}", "ours", percentile(samples, q), "ms")
            report.add(name, f"latency p{q}", "raw", percentile(raw_samples, q), "ms", latency_note)
    finally:
        await baseline.close()


# -- targets ---------------------------------------------------------------------------------------


def _ratio(report: Report, a: tuple[str, str, str], b: tuple[str, str, str] | None) -> float | None:
    x = report.get(*a)
    y = report.get(*b) if b else None
    return x / y if x is not None and y else None


def targets(report: Report) -> list[dict[str, Any]]:
    """Every target of the issue: what was measured, the bound, whether it is met."""
    rows: list[dict[str, Any]] = []

    def add(backend: str, label: str, value: float | None, op: str, bound: float, basis: str = "") -> None:
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        rows.append(
            {"backend": backend, "target": label, "value": value, "op": op, "bound": bound, "met": met, "basis": basis}
        )

    for backend in ("memory", "redis", "rabbitmq"):
        c = PEER_CONCURRENCY[backend]
        drain = f"drain c={c}"
        best_drain = peers.best_peer(report, backend, drain)
        if backend != "rabbitmq":
            bound = 1.5
        else:
            bound = 1.0
            vs_raw = _ratio(report, (backend, drain, "ours"), (backend, drain, "raw"))
            add(backend, f"{drain} / raw consume+ack", vs_raw, ">=", 0.9)
        ours_drain = report.get(backend, drain, "ours")
        add(
            backend,
            f"{drain} / best peer",
            ours_drain / best_drain[1] if ours_drain and best_drain else None,
            ">=",
            bound,
            f"{best_drain[0]} {best_drain[1]:,.0f} jobs/s" if best_drain else "no peer measured",
        )
        if backend == "memory":
            add(backend, "publish single (async), jobs/s", report.get(backend, PUBLISH, "ours"), ">=", 50_000)
        else:
            single, many = (0.7, 0.5) if backend == "redis" else (0.8, 0.8)
            raw_single, raw_many = RAW_NOTES[backend][:2]
            add(
                backend,
                f"publish single / raw {raw_single}",
                _ratio(report, (backend, PUBLISH, "ours"), (backend, PUBLISH, "raw")),
                ">=",
                single,
            )
            add(
                backend,
                f"publish_many / raw {raw_many}",
                _ratio(report, (backend, PUBLISH_MANY, "ours"), (backend, PUBLISH_MANY, "raw")),
                ">=",
                many,
            )
        p50 = 0.3 if backend == "memory" else 1.0
        add(backend, "latency p50, ms", report.get(backend, "latency p50", "ours"), "<=", p50)
        add(backend, "latency p99, ms", report.get(backend, "latency p99", "ours"), "<=", 5.0)
        add(
            backend,
            "sync publish / async publish",
            _ratio(report, (backend, PUBLISH_SYNC, "ours"), (backend, PUBLISH, "ours")),
            ">=",
            0.5,
        )
    for backend in ("memory", "redis", "rabbitmq", "rabbitmq+redis"):
        ratio = report.get(backend, lifecycle.DRAIN_RATIO, "ours")
        if ratio is not None:
            add(backend, "drain with records / without (state=False)", ratio, ">=", 0.8)
    for backend in ("memory", "redis", "rabbitmq"):
        scenario = hooks.DRAIN.format(c=PEER_CONCURRENCY[backend])
        ratio = _ratio(report, (backend, scenario, hooks.WHO_PROMETHEUS), (backend, scenario, hooks.WHO_BARE))
        if ratio is not None:
            add(backend, "drain with PrometheusHook / hook-free", ratio, ">=", 0.9)
    for backend in ("memory", "redis", "rabbitmq"):
        add(backend, "delayed start lateness p99, ms", report.get(backend, delays.LATE_P99, "ours"), "<=", 50.0)
    for backend in ("redis", "rabbitmq"):
        fired = report.get(backend, schedules.FIRES, "ours")
        add(backend, "schedule fires in 10 s, at least", fired, ">=", schedules.WINDOW - 1)
        add(backend, "schedule fires in 10 s, at most", fired, "<=", schedules.WINDOW + 1)
        add(backend, "schedule fire ids seen twice", report.get(backend, schedules.REPEATS, "ours"), "<=", 0)
    add("rabbitmq", "gap between fires, leader SIGKILLed, s", report.get("rabbitmq", schedules.GAP, "ours"), "<=", 5.0)
    add(
        "facade",
        "no-op facade call / bare run_coroutine_threadsafe",
        _ratio(report, ("facade", "no-op call", "ours"), ("facade", "no-op call", "raw")),
        "<=",
        1.3,
    )
    return rows


def informational(report: Report) -> list[tuple[str, str, float | None]]:
    """Ratios without a target, for context."""
    lines: list[tuple[str, str, float | None]] = []
    for backend in ("memory", "redis", "rabbitmq"):
        peer = peers.best_peer(report, backend, PEER_PUBLISH)
        mine = report.get(backend, PUBLISH, "ours")
        if peer and mine:
            lines.append((backend, f"publish single / best peer ({peer[0]} {peer[1]:,.0f}/s)", mine / peer[1]))
        raw_c = RAW_NOTES[backend][3]
        lines.append(
            (
                backend,
                f"drain c={raw_c} / raw {RAW_NOTES[backend][2]}",
                _ratio(report, (backend, f"drain c={raw_c}", "ours"), (backend, f"drain c={raw_c}", "raw")),
            )
        )
        lines.append(
            (
                backend,
                "latency p50 / raw driver's",
                _ratio(report, (backend, "latency p50", "ours"), (backend, "latency p50", "raw")),
            )
        )
    return [line for line in lines if line[2] is not None]


def _print_targets(rows: list[dict[str, Any]], info: list[tuple[str, str, float | None]], every: bool) -> None:
    """Every target (``every``), else only those this run measured (``--only`` some sections)."""
    print("\nTargets (figures from this run):")
    for row in rows:
        if not every and row["value"] is None:
            continue
        value = "n/a" if row["value"] is None else f"{row['value']:,.2f}"
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[row["met"]]
        basis = f"  ({row['basis']})" if row["basis"] else ""
        print(f"  {row['backend']:<14} {row['target']:<46} {value:>10} {row['op']} {row['bound']:<8g} {verdict}{basis}")
    print("\nFor context:")
    for backend, label, ratio in info:
        print(f"  {backend:<14} {label:<58} {ratio:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--n", type=int, default=6000, help="jobs per throughput measurement (default 6000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per side-by-side pair")
    parser.add_argument("--latency-n", type=int, default=1000, help="jobs for the latency percentiles")
    parser.add_argument("--peer-n", type=int, default=3000, help="jobs per peer on a broker (0: skip peers)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle consumer CPU window (0: skip)")
    parser.add_argument("--rss-n", type=int, default=100_000, help="queued jobs for the memory figure (0: skip)")
    parser.add_argument("--backends", default="memory,redis,rabbitmq")
    parser.add_argument("--redis-url", default=os.environ.get("MINDTRACE_JOBS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--amqp-url", default=os.environ.get("MINDTRACE_JOBS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--lifecycle-n", type=int, default=200, help="jobs for the lifecycle percentiles")
    parser.add_argument("--lifecycle-drain-n", type=int, default=6000, help="jobs per lifecycle drain side")
    parser.add_argument(
        "--lifecycle-replay-n", type=int, default=10_000, help="finished jobs kept for the first-lookup row (0: skip)"
    )
    parser.add_argument("--lifecycle-mem-n", type=int, default=2000, help="retained results for Redis memory (0: skip)")
    parser.add_argument("--delay-n", type=int, default=1000, help="delayed jobs for the lateness percentiles (0: skip)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/latest.json"))
    args = parser.parse_args()
    args.rounds = max(1, args.rounds)
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"--only takes some of {','.join(SECTIONS)}, not {','.join(sorted(only - set(SECTIONS)))}")

    report = Report(machine=machine())
    report.settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if "url" not in k}
    print(f"mindtrace-jobs benchmarks on {report.machine['cpus']} CPUs, Python {report.machine['python']}, n={args.n}")
    print(f"  {'backend':<14} {'scenario':<34} {'who':<10} {'value':>12} unit")
    if "facade" in only:
        facade.measure(report, 20_000)
    urls = {"memory": "memory://", "redis": args.redis_url, "rabbitmq": args.amqp_url}
    reachable: dict[str, str] = {}
    for name in args.backends.split(","):
        url = urls[name]
        if name != "memory" and not _reachable(url):
            print(f"  (skipping {name}: not reachable)")
            continue
        reachable[name] = url
        factory: Callable[[], Backend] = LocalClient if name == "memory" else (lambda u=url: from_url(u))
        if "core" in only:
            asyncio.run(run_backend(report, name, factory, url, args))
        if "peers" in only and args.peer_n > 0:
            # Peers get rounds as ours does; in memory, rounds as long as ours (jobs there take microseconds).
            peer_n = max(1, (args.n if name == "memory" else args.peer_n) // args.rounds)
            peers.measure(report, name, url, peer_n, PEER_CONCURRENCY[name], args.rounds)
        if "hooks" in only:
            hooks.measure(report, name, factory, max(1, args.n // args.rounds), args.rounds, PEER_CONCURRENCY[name])
        if "delays" in only and args.delay_n > 0:
            delays.measure(report, name, factory, args.delay_n)
        if "schedules" in only and name != "memory":  # the schedulers are other processes: brokers only
            schedules.measure(report, name, url)
        if "resources" in only and name == "memory" and args.rss_n > 0:
            resources.memory_per_100k(report, args.rss_n)
    if "resources" in only and args.idle_seconds > 0 and reachable:
        resources.idle_cpu(report, reachable, args.idle_seconds)
    if "lifecycle" in only:
        lifecycle.measure(report, args.backends.split(","), urls, lambda u: u == "memory://" or _reachable(u), args)
    rows = targets(report)
    info = informational(report)
    _print_targets(rows, info, every=only == set(SECTIONS))
    report.targets = rows
    report.write_json(args.json)
    print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
