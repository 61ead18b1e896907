"""The worker CLI in subprocesses on real brokers: draining, graceful shutdown, exit codes, config, processes, logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from mindtrace.jobs import AsyncOrchestrator, JobStatus, job_from_schema
from mindtrace.jobs.cli.exit_codes import EXIT_CONFIG, EXIT_REFUSED
from tests.jobs.cli_consumers import Nap, Signed, schema_for

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = "tests.jobs.cli_consumers:Sleeper"
BLOCKING = "tests.jobs.cli_consumers:BlockingSleeper"


class Worker:
    """A ``python -m mindtrace.jobs worker ...`` subprocess and every line it printed (stdout and stderr)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_line(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.lines) < count:
            if self.process.returncode is not None or time.monotonic() > deadline:
                await asyncio.wait_for(self._reader, 5)
                pytest.fail(f"no line with {text!r} from the worker (exit {self.process.returncode}):\n{self.output}")
            await asyncio.sleep(0.05)

    async def exit_code(self, timeout: float = 30.0) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"the worker did not exit within {timeout}s:\n{self.output}")
        await asyncio.wait_for(self._reader, 5)
        return code

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)


async def start_worker(
    *args: str, env: dict[str, str] | None = None, module: Sequence[str] = ("mindtrace.jobs", "worker")
) -> Worker:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MINDTRACE_JOBS_") or k.endswith("_URL")}
    environ.pop("MINDTRACE_JOBS_URL", None)
    environ.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *module,
        *args,
        cwd=ROOT,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    return Worker(process)


@contextlib.asynccontextmanager
async def workers() -> AsyncIterator[list[Worker]]:
    """Workers started in the block; any still running at its end is killed."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for worker in started:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()


@contextlib.asynccontextmanager
async def queues(url: str, count: int = 1) -> AsyncIterator[tuple[AsyncOrchestrator, list[str]]]:
    """An orchestrator on ``url`` and ``count`` fresh queues with the test schema; deleted at the end."""
    names = [f"cli-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    async with AsyncOrchestrator(url) as orchestrator:
        for name in names:
            await orchestrator.register(schema_for(name))
        try:
            yield orchestrator, names
        finally:
            for name in names:
                with contextlib.suppress(Exception):
                    await orchestrator.delete_queue(name)


async def publish(orchestrator: AsyncOrchestrator, queue: str, count: int, seconds: float) -> list[str]:
    jobs = [job_from_schema(schema_for(queue), Nap(seconds=seconds)) for _ in range(count)]
    return [str(handle) for handle in await orchestrator.publish_many(queue, jobs)]


async def wait_running(orchestrator: AsyncOrchestrator, queue: str, ids: list[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        infos = [await orchestrator.job_info(job_id, queue) for job_id in ids]
        if all(info.status is JobStatus.RUNNING for info in infos):
            return
        assert time.monotonic() < deadline, [info.status for info in infos]
        await asyncio.sleep(0.05)


async def results(orchestrator: AsyncOrchestrator, queue: str, ids: list[str], timeout: float = 30.0) -> list[Signed]:
    outputs = await asyncio.gather(*(orchestrator.job(job_id, queue).result_as(Signed, timeout) for job_id in ids))
    return list(outputs)


def starts(worker: Worker, job_id: str) -> int:
    return sum(line.endswith(f"started {job_id}") for line in worker.lines)


# -- draining and graceful shutdown ----------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
async def test_drains_jobs_of_two_consumer_classes_side_by_side(broker: str, redis_url: str, amqp_url: str) -> None:
    url = redis_url if broker == "redis" else amqp_url
    async with queues(url, 2) as (orchestrator, (async_queue, sync_queue)), workers() as started:
        ids = await publish(orchestrator, async_queue, 10, 0.0)
        sync_ids = await publish(orchestrator, sync_queue, 10, 0.0)
        env = {"CLI_TEST_QUEUE": async_queue, "CLI_TEST_QUEUE2": sync_queue}
        worker = await start_worker(SLEEPER, BLOCKING, "--url", url, "--concurrency", "4", env=env)
        started.append(worker)
        outputs = await results(orchestrator, async_queue, ids) + await results(orchestrator, sync_queue, sync_ids)
        assert {output.pid for output in outputs} == {worker.process.pid}
        worker.signal()
        assert await worker.exit_code() == 0, worker.output
        assert await orchestrator.count_queue_messages(async_queue) == 0
        assert await orchestrator.count_queue_messages(sync_queue) == 0


async def test_sigterm_lets_running_jobs_finish_within_the_shutdown_timeout(redis_url: str) -> None:
    async with queues(redis_url) as (orchestrator, (queue,)), workers() as started:
        ids = await publish(orchestrator, queue, 3, 2.0)
        worker = await start_worker(
            SLEEPER, "--url", redis_url, "--concurrency", "3", "--shutdown-timeout", "5", env={"CLI_TEST_QUEUE": queue}
        )
        started.append(worker)
        await wait_running(orchestrator, queue, ids)
        signalled = time.monotonic()
        worker.signal()
        code = await worker.exit_code()
        took = time.monotonic() - signalled
        assert code == 0, worker.output
        assert took < 3.0, f"exit {took:.2f}s after SIGTERM"
        for job_id in ids:
            info = await orchestrator.job_info(job_id, queue)
            assert info.status is JobStatus.SUCCEEDED and info.attempts == 1
            assert starts(worker, job_id) == 1
        assert await orchestrator.count_queue_messages(queue) == 0
        print(f"2-s jobs, --shutdown-timeout 5: exit {took:.2f}s after SIGTERM")


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
async def test_jobs_over_the_shutdown_timeout_are_given_back_uncharged_and_rerun(
    broker: str, redis_url: str, amqp_url: str
) -> None:
    url = redis_url if broker == "redis" else amqp_url
    async with queues(url) as (orchestrator, (queue,)), workers() as started:
        ids = await publish(orchestrator, queue, 2, 10.0)
        env = {"CLI_TEST_QUEUE": queue}
        worker = await start_worker(
            SLEEPER, "--url", url, "--concurrency", "2", "--shutdown-timeout", "2", "--log-level", "info", env=env
        )
        started.append(worker)
        await wait_running(orchestrator, queue, ids)
        signalled = time.monotonic()
        worker.signal()
        code = await worker.exit_code()
        took = time.monotonic() - signalled
        assert code == 0, worker.output
        assert took < 2.5, f"exit {took:.2f}s after SIGTERM"
        for job_id in ids:
            info = await orchestrator.job_info(job_id, queue)
            assert info.status is JobStatus.QUEUED and info.attempts == 0, info
        assert "2 given back" in worker.output
        rerun = await start_worker(SLEEPER, "--url", url, env={**env, "CLI_TEST_FAST": "1"})
        started.append(rerun)
        outputs = await results(orchestrator, queue, ids)
        assert {output.pid for output in outputs} == {rerun.process.pid}
        for job_id in ids:
            assert (await orchestrator.job_info(job_id, queue)).attempts == 1
        rerun.signal()
        assert await rerun.exit_code() == 0, rerun.output
        print(f"10-s jobs on {broker}, --shutdown-timeout 2: exit {took:.2f}s after SIGTERM")


async def test_a_second_signal_cuts_the_shutdown_short(redis_url: str) -> None:
    async with queues(redis_url) as (orchestrator, (queue,)), workers() as started:
        ids = await publish(orchestrator, queue, 1, 10.0)
        worker = await start_worker(SLEEPER, "--url", redis_url, env={"CLI_TEST_QUEUE": queue})
        started.append(worker)
        await wait_running(orchestrator, queue, ids)
        signalled = time.monotonic()
        worker.signal(signal.SIGINT)
        await worker.wait_for_line("received SIGINT")
        worker.signal(signal.SIGTERM)
        assert await worker.exit_code() == 0, worker.output
        assert time.monotonic() - signalled < 2.0
        info = await orchestrator.job_info(ids[0], queue)
        assert info.status is JobStatus.QUEUED and info.attempts == 0


# -- exit codes and configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("tests.jobs.no_such_module:Sleeper", "tests.jobs.no_such_module"),
        ("tests.jobs.cli_consumers:NoSuchClass", "NoSuchClass"),
        ("tests.jobs.cli_consumers:NotAConsumer", "is not a consumer class"),
    ],
)
async def test_a_bad_import_path_exits_78_naming_it(target: str, named: str, redis_url: str) -> None:
    worker = await start_worker(target, "--url", redis_url)
    assert await worker.exit_code() == EXIT_CONFIG, worker.output
    assert named in worker.output


async def test_bad_options_exit_78_naming_them(redis_url: str) -> None:
    worker = await start_worker(SLEEPER)  # no URL anywhere
    assert await worker.exit_code() == EXIT_CONFIG
    assert "--url" in worker.output and "MINDTRACE_JOBS_URL" in worker.output
    worker = await start_worker(SLEEPER, "--url", redis_url, env={"MINDTRACE_JOBS_CONCURRENCY": "many"})
    assert await worker.exit_code() == EXIT_CONFIG
    assert "MINDTRACE_JOBS_CONCURRENCY" in worker.output and "'many'" in worker.output
    worker = await start_worker(SLEEPER, "--url", "redis://u:pw-Zq81xR@127.0.0.1:6379/0?bogus=1")
    assert await worker.exit_code() == EXIT_CONFIG
    assert "bogus" in worker.output and "pw-Zq81xR" not in worker.output


@pytest.mark.parametrize(
    "url",
    ["amqp://guest:pw-Zq81xR@127.0.0.1:5672/", "redis://nobody:pw-Zq81xR@127.0.0.1:6379/0"],
    ids=["rabbitmq", "redis"],
)
async def test_a_refused_password_exits_77_without_printing_it(url: str, redis_url: str, amqp_url: str) -> None:
    worker = await start_worker(SLEEPER, "--url", url, env={"CLI_TEST_QUEUE": "cli-refused"})
    assert await worker.exit_code() == EXIT_REFUSED, worker.output
    assert "refused" in worker.output and "127.0.0.1" in worker.output
    assert "pw-Zq81xR" not in worker.output


async def test_environment_only_configuration_with_json_logs(redis_url: str) -> None:
    async with queues(redis_url) as (orchestrator, (queue,)), workers() as started:
        ids = await publish(orchestrator, queue, 4, 0.0)
        env = {
            "CLI_TEST_QUEUE": queue,
            "MINDTRACE_JOBS_URL": redis_url,
            "MINDTRACE_JOBS_CONCURRENCY": "2",
            "MINDTRACE_JOBS_SHUTDOWN_TIMEOUT": "3",
            "MINDTRACE_JOBS_LOG_LEVEL": "info",
            "MINDTRACE_JOBS_LOG_FORMAT": "json",
        }
        worker = await start_worker(SLEEPER, env=env)
        started.append(worker)
        await results(orchestrator, queue, ids)
        await worker.wait_for_line(f"finished {ids[-1]}")
        worker.signal()
        assert await worker.exit_code() == 0, worker.output
    records = [json.loads(line) for line in worker.lines]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "message"} <= record.keys() for record in records)
    consuming = next(r for r in records if "consuming" in r["message"])
    assert "concurrency 2, shutdown timeout 3s" in consuming["message"] and consuming["job_id"] is None
    for job_id in ids:
        (record,) = [r for r in records if r["message"] == f"started {job_id}"]
        assert record["logger"] == "tests.cli" and record["level"] == "INFO"
        assert (record["job_id"], record["queue"], record["attempt"]) == (job_id, queue, 1)


async def test_a_flag_wins_over_its_environment_variable_and_text_logs_show_the_job(redis_url: str) -> None:
    async with queues(redis_url) as (orchestrator, (queue,)), workers() as started:
        ids = await publish(orchestrator, queue, 1, 0.0)
        env = {
            "CLI_TEST_QUEUE": queue,
            "MINDTRACE_JOBS_CONCURRENCY": "bad",
            "MINDTRACE_JOBS_URL": "redis://nowhere:1/0",
        }
        worker = await start_worker(SLEEPER, "--url", redis_url, "--concurrency", "3", env=env)
        started.append(worker)
        await results(orchestrator, queue, ids)
        await worker.wait_for_line(f"finished {ids[0]}")
        worker.signal()
        assert await worker.exit_code() == 0, worker.output
        assert "concurrency 3" in worker.output
        assert f"[job {ids[0]} {queue} attempt 1]: started {ids[0]}" in worker.output


# -- processes and the blocking API ----------------------------------------------------------------------


async def test_two_processes_both_consume(redis_url: str) -> None:
    async with queues(redis_url) as (orchestrator, (queue,)), workers() as started:
        worker = await start_worker(SLEEPER, "--url", redis_url, "--processes", "2", env={"CLI_TEST_QUEUE": queue})
        started.append(worker)
        await worker.wait_for_line("consuming", count=2)
        ids = await publish(orchestrator, queue, 12, 0.3)
        outputs = await results(orchestrator, queue, ids)
        pids = {output.pid for output in outputs}
        assert len(pids) == 2 and worker.process.pid not in pids
        signalled = time.monotonic()
        worker.signal()
        assert await worker.exit_code() == 0, worker.output
        print(f"--processes 2: exit {time.monotonic() - signalled:.2f}s after SIGTERM")


async def test_blocking_consume_with_handle_signals_shuts_down_on_sigterm(redis_url: str) -> None:
    async with queues(redis_url) as (orchestrator, (queue,)), workers() as started:
        ids = await publish(orchestrator, queue, 2, 1.0)
        script = await start_worker(redis_url, queue, module=("tests.jobs.cli_consumers",))
        started.append(script)
        await wait_running(orchestrator, queue, ids)
        script.signal()
        assert await script.exit_code(10) == 0, script.output
        assert "returned 2" in script.output
        for job_id in ids:
            assert (await orchestrator.job_info(job_id, queue)).status is JobStatus.SUCCEEDED


async def test_a_child_that_dies_stops_the_others_and_gives_the_exit_code(redis_url: str) -> None:
    async with queues(redis_url) as (_, (queue,)), workers() as started:
        worker = await start_worker(SLEEPER, "--url", redis_url, "--processes", "2", env={"CLI_TEST_QUEUE": queue})
        started.append(worker)
        await worker.wait_for_line("consuming", count=2)
        line = next(line for line in worker.lines if "started 2 worker processes: " in line)
        first, second = (int(pid) for pid in line.rsplit(": ", 1)[1].split(", "))
        os.kill(first, signal.SIGKILL)
        assert await worker.exit_code() == 128 + signal.SIGKILL, worker.output
        assert f"worker process {first} exited unexpectedly" in worker.output
        assert f"worker process {second} exited with code 0" in worker.output


# -- metrics and health ----------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("processes", [1, 2])
async def test_metrics_port_serves_the_workers_counters_and_health(processes: int, redis_url: str) -> None:
    from tests.jobs.test_metrics import _get, scrape, value

    port = _free_port()
    async with queues(redis_url) as (orchestrator, (queue,)), workers() as started:
        worker = await start_worker(
            SLEEPER,
            "--url",
            redis_url,
            "--processes",
            str(processes),
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            env={"CLI_TEST_QUEUE": queue},
        )
        started.append(worker)
        await worker.wait_for_line("consuming", count=processes)
        ids = await publish(orchestrator, queue, 12, 0.05)
        outputs = await results(orchestrator, queue, ids)
        assert len({output.pid for output in outputs}) == processes
        samples = await scrape(port)
        assert value(samples, "mindtrace_jobs_started_total", queue=queue) == 12
        assert value(samples, "mindtrace_jobs_succeeded_total", queue=queue) == 12
        assert value(samples, "mindtrace_jobs_run_duration_seconds_count", queue=queue) == 12
        assert all(job_id not in str(samples) for job_id in ids)  # no job id in any label
        deadline = time.monotonic() + 20
        while (status := (await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz"))[0]) != 200:
            assert time.monotonic() < deadline, f"/healthz stayed {status}"
            await asyncio.sleep(0.2)
        worker.signal()
        assert await worker.exit_code() == 0, worker.output
