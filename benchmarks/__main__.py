"""python -m benchmarks [--n N] [--latency-n N] [--backends memory,redis,rabbitmq] [--json PATH]."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks import facade, ours, raw, resources
from benchmarks.harness import Report, machine
from mindtrace.jobs import LocalClient, from_url
from mindtrace.jobs.backends.base import Backend

# Peer figures measured on the 2-core reference machine (issue 5), jobs/s: one worker process, no-op job,
# 20,000 jobs. Used only when the peer itself is not installed to be measured in this run.
REFERENCE_PEERS = {
    ("memory", "drain"): ("Huey", 30_000),
    ("redis", "drain"): ("Huey", 3_600),
    ("redis", "publish"): ("Huey", 9_200),
    ("rabbitmq", "drain"): ("Kombu", 6_100),
    ("rabbitmq", "publish"): ("Dramatiq", 1_500),
}


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=1):
            return True
    except OSError:
        return False


def _factories(names: list[str], redis_url: str, amqp_url: str) -> dict[str, tuple[Callable[[], Backend], str]]:
    found: dict[str, tuple[Callable[[], Backend], str]] = {}
    for name in names:
        if name == "memory":
            found[name] = (LocalClient, "memory://")
        elif name == "redis" and _reachable(redis_url):
            found[name] = (lambda: from_url(redis_url), redis_url)
        elif name == "rabbitmq" and _reachable(amqp_url):
            found[name] = (lambda: from_url(amqp_url), amqp_url)
        else:
            print(f"  (skipping {name}: not reachable)")
    return found


def _summary(report: Report) -> None:
    print("\nRatios (ours / baseline, same run):")
    lines = [
        ("memory", "publish single (async)", "memory", "publish single (async)", "raw", "publish vs PriorityQueue.put"),
        ("memory", "drain c=1", "memory", "drain c=1", "raw", "drain c=1 vs PriorityQueue.get"),
        (
            "redis",
            "publish single (async)",
            "redis",
            "publish single (async)",
            "raw",
            "publish vs LPUSH (target >= 0.70)",
        ),
        (
            "redis",
            "publish_many (batch 500)",
            "redis",
            "publish_many (batch 500)",
            "raw",
            "publish_many vs pipelined LPUSH (>= 0.50)",
        ),
        ("redis", "drain c=16", "redis", "drain c=1", "raw", "drain c=16 vs raw BRPOP"),
        (
            "rabbitmq",
            "publish single (async)",
            "rabbitmq",
            "publish single (async)",
            "raw",
            "publish vs confirmed publish (>= 0.80)",
        ),
        (
            "rabbitmq",
            "publish_many (batch 500)",
            "rabbitmq",
            "publish_many (batch 500)",
            "raw",
            "publish_many vs batched confirms (>= 0.80)",
        ),
        ("rabbitmq", "drain c=16", "rabbitmq", "drain c=16", "raw", "drain c=16 vs consume+ack (>= 0.90)"),
    ]
    for backend, scenario, base_backend, base_scenario, who, label in lines:
        a = report.get(backend, scenario, "ours")
        b = report.get(base_backend, base_scenario, who)
        if a and b:
            print(f"  {backend:<9} {label:<48} {a / b:6.2f}")
    for backend in ("memory", "redis", "rabbitmq"):
        sync = report.get(backend, "publish single (sync facade)", "ours")
        async_ = report.get(backend, "publish single (async)", "ours")
        if sync and async_:
            print(f"  {backend:<9} {'sync publish vs async publish (>= 0.50)':<48} {sync / async_:6.2f}")
    for (backend, kind), (peer, figure) in REFERENCE_PEERS.items():
        scenario = "drain c=16" if kind == "drain" else "publish single (async)"
        if backend == "memory" and kind == "drain":
            scenario = "drain c=1"
        a = report.get(backend, scenario, "ours")
        if a:
            print(f"  {backend:<9} {f'{scenario} vs {peer} {figure:,} (reference figure)':<48} {a / figure:6.2f}")
    hop, bare = report.get("facade", "no-op call", "ours"), report.get("facade", "no-op call", "raw")
    if hop and bare:
        print(f"  {'facade':<9} {'no-op hop vs bare run_coroutine_threadsafe (<= 1.3)':<48} {hop / bare:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="jobs per throughput measurement (default 5000)")
    parser.add_argument("--latency-n", type=int, default=1000, help="jobs for the latency percentiles")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle consumer CPU window")
    parser.add_argument("--backends", default="memory,redis,rabbitmq")
    parser.add_argument("--redis-url", default=os.environ.get("MINDTRACE_JOBS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--amqp-url", default=os.environ.get("MINDTRACE_JOBS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/latest.json"))
    args = parser.parse_args()

    report = Report(machine=machine())
    print(f"mindtrace-jobs benchmarks on {report.machine['cpus']} CPUs, Python {report.machine['python']}, n={args.n}")
    print(f"  {'backend':<9} {'scenario':<34} {'who':<10} {'value':>12} unit")
    facade.measure(report, 20_000)
    found = _factories(args.backends.split(","), args.redis_url, args.amqp_url)
    for name, (factory, url) in found.items():
        asyncio.run(ours.measure_backend(report, name, factory, args.n, args.latency_n))
        if name == "memory":
            asyncio.run(raw.memory(report, args.n))
            resources.memory_per_100k(report)
        elif name == "redis":
            asyncio.run(raw.redis(report, url, args.n))
        elif name == "rabbitmq":
            asyncio.run(raw.rabbitmq(report, url, args.n))
        if args.idle_seconds > 0:
            resources.idle_cpu(report, name, url, args.idle_seconds)
    _summary(report)
    report.write_json(args.json)
    print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
