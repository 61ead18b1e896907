"""The blocking API's checklist: threads, running loops, its own loop thread, close, fork, exit, Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mindtrace.jobs import (
    ClosedError,
    Consumer,
    ForkError,
    Job,
    LocalClient,
    LoopThreadError,
    Orchestrator,
    WrongEventLoopError,
)
from mindtrace.jobs._loop_thread import get_loop_thread
from tests.jobs.conformance.models import image_schema, make_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def orchestrator() -> Orchestrator:
    orch = Orchestrator(LocalClient())
    yield orch
    orch.close()


def test_calls_from_eight_threads_at_once(orchestrator: Orchestrator) -> None:
    schema = image_schema("threads")
    orchestrator.register(schema)

    def publish_many(worker: int) -> list[str]:
        return [orchestrator.publish("threads", make_job(schema, worker * 100 + i)) for i in range(50)]

    with ThreadPoolExecutor(8) as pool:
        ids = [i for batch in pool.map(publish_many, range(8)) for i in batch]
    assert len(set(ids)) == 400
    assert orchestrator.count_queue_messages("threads") == 400


def test_blocking_api_works_inside_a_running_event_loop(orchestrator: Orchestrator) -> None:
    schema = image_schema("in-loop")

    async def main() -> Job | None:
        orchestrator.register(schema)
        orchestrator.publish("in-loop", make_job(schema, 1))
        return orchestrator.receive_message("in-loop")

    received = asyncio.run(main())
    assert received is not None and received.payload.input.image_path == "/img/1.jpg"


def test_call_from_the_loop_thread_itself_is_a_clear_error(orchestrator: Orchestrator) -> None:
    async def from_loop_thread() -> int:
        return orchestrator.count_queue_messages("anything")

    future = asyncio.run_coroutine_threadsafe(from_loop_thread(), get_loop_thread().loop)
    with pytest.raises(LoopThreadError, match="async API"):
        future.result(timeout=5)


def test_use_after_close_is_a_clear_error() -> None:
    orch = Orchestrator(LocalClient())
    orch.declare_queue("closing")
    orch.close()
    orch.close()
    with pytest.raises(ClosedError, match="closed"):
        orch.count_queue_messages("closing")


def test_context_manager_closes() -> None:
    with Orchestrator(LocalClient()) as orch:
        orch.declare_queue("ctx")
    with pytest.raises(ClosedError):
        orch.declare_queue("ctx")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_use_after_fork_names_the_process(orchestrator: Orchestrator) -> None:
    orchestrator.declare_queue("forked")
    parent = os.getpid()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            orchestrator.count_queue_messages("forked")
            message = b"no error"
        except ForkError as exc:
            message = str(exc).encode()
        except BaseException as exc:  # pragma: no cover - reported to the parent
            message = repr(exc).encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert str(parent) in message and "fork" in message
    assert orchestrator.count_queue_messages("forked") == 0


def test_backend_used_from_a_second_event_loop_says_so() -> None:
    backend = LocalClient()
    asyncio.run(backend.declare_queue("first-loop"))
    with pytest.raises(WrongEventLoopError, match="event loop"):
        asyncio.run(backend.count("first-loop"))


def test_sync_run_goes_to_a_bounded_pool_off_the_loop(orchestrator: Orchestrator) -> None:
    schema = image_schema("pool")
    orchestrator.register(schema)
    for i in range(12):
        orchestrator.publish("pool", make_job(schema, i))
    threads: set[str] = set()
    loop_thread = get_loop_thread().thread

    class Recorder(Consumer):
        def run(self, job: Job) -> None:
            assert threading.current_thread() is not loop_thread
            threads.add(threading.current_thread().name)
            time.sleep(0.01)

    consumer = Recorder("pool")
    consumer.connect(orchestrator)
    assert consumer.consume(num_messages=12, concurrency=3) == 12
    assert 1 <= len(threads) <= 3
    assert all(name.startswith("mindtrace-jobs-run") for name in threads)


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_a_script_that_never_closes_exits_promptly() -> None:
    with subprocess.Popen(
        _script(
            """
            from mindtrace.jobs import Orchestrator, LocalClient
            orch = Orchestrator(LocalClient())
            orch.declare_queue("q")
            print("done", flush=True)
            """
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "done"
        finished_main = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - finished_main < 2.0


def test_ctrl_c_during_consume_loses_no_job() -> None:
    with subprocess.Popen(
        _script(
            """
            import os, sys, time
            from mindtrace.jobs import Consumer, LocalClient, Orchestrator
            from tests.jobs.conformance.models import image_schema, make_job

            orch = Orchestrator(LocalClient())
            schema = image_schema("work")
            orch.register(schema)
            for i in range(3):
                orch.publish("work", make_job(schema, i))

            class Slow(Consumer):
                def run(self, job):
                    os.write(1, b"started\\n")
                    time.sleep(3600)

            consumer = Slow("work")
            consumer.connect(orch)
            try:
                consumer.consume(concurrency=2)
            except KeyboardInterrupt:
                print("count", orch.count_queue_messages("work"), flush=True)
                sys.exit(0)
            print("consume returned", flush=True)
            sys.exit(1)
            """
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert out.strip().splitlines()[-1] == "count 3"


def test_ctrl_c_during_receive_message_leaves_no_task_to_take_the_next_job(
    backend_url: str, new_queue: Callable[[str], str]
) -> None:
    # Interrupted, the blocking receive must end on the loop thread too: a receive left running there would
    # take the next job published, ack it and hand it to nobody.
    with subprocess.Popen(
        _script(
            f"""
            import sys, time
            from mindtrace.jobs import Orchestrator
            from tests.jobs.conformance.models import image_schema, make_job

            queue = {new_queue("ctrl-c")!r}
            orch = Orchestrator({backend_url!r})
            schema = image_schema(queue)
            orch.register(schema)
            print("waiting", flush=True)
            try:
                orch.receive_message(queue, timeout=60)
            except KeyboardInterrupt:
                orch.publish(queue, make_job(schema, 1))
                time.sleep(0.5)  # time for a receive left running to take it
                print("count", orch.count_queue_messages(queue), flush=True)
                job = orch.receive_message(queue, timeout=5)
                print("received", job and job.payload.input.image_path, flush=True)
                orch.delete_queue(queue)
                orch.close()
                sys.exit(0)
            print("receive returned", flush=True)
            sys.exit(1)
            """
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.5)  # the receive is waiting on the broker now
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert out.strip().splitlines()[-2:] == ["count 1", "received /img/1.jpg"], out
