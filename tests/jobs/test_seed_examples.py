"""The examples of the two seed documents, run as written (pseudo-code replaced by something real).

Each example imports exactly as its seed does (``# noqa: I001``: the seeds' own order of names is kept).
"""

from __future__ import annotations

import ast
import threading
from urllib.parse import urlsplit

import pytest

import mindtrace.jobs

#: Every import statement of the two seed documents, verbatim.
SEED_IMPORTS = (
    "from mindtrace.jobs import Job, JobSchema, JobInput, JobOutput",
    "from mindtrace.jobs.mindtrace.types import JobType",
    "from mindtrace.jobs import Orchestrator, LocalClient",
    "from mindtrace.jobs import Orchestrator, RedisClient",
    "from mindtrace.jobs import Orchestrator, RabbitMQClient",
    "from mindtrace.jobs import Orchestrator, LocalClient, Consumer, JobSchema, JobInput, JobOutput, job_from_schema",
    "from mindtrace.jobs import RedisClient",
    "from mindtrace.jobs import RabbitMQClient",
)


@pytest.mark.parametrize("statement", SEED_IMPORTS)
def test_seed_import_works_as_written_and_gives_the_public_objects(statement: str) -> None:
    namespace: dict[str, object] = {}
    exec(statement, namespace)
    (node,) = ast.parse(statement).body
    assert isinstance(node, ast.ImportFrom)
    for alias in node.names:
        assert namespace[alias.name] is getattr(mindtrace.jobs, alias.name), alias.name


def test_seed_000_job_structure() -> None:
    from mindtrace.jobs import Job, JobSchema, JobInput, JobOutput  # noqa: I001
    from mindtrace.jobs.mindtrace.types import JobType

    class ClassificationInput(JobInput):
        model: str
        epochs: int
        batch_size: int = 32

    class DetectionOutput(JobOutput):
        accuracy: float

    # Create job schema
    schema = JobSchema(
        name="Detection_inference",
        input=ClassificationInput(model="yolo:x", epochs=5),
        output=DetectionOutput,
    )

    job = Job(
        id="job_123",
        name="classification_inference",
        job_type=JobType.CLASSIFICATION,
        payload=schema,
        priority=5,
    )
    assert job.payload.input.batch_size == 32
    assert job.payload.output_type is DetectionOutput
    assert job.queue == "classification_jobs"


def test_seed_000_backends_and_publishing() -> None:
    from mindtrace.jobs import Job, JobSchema, JobInput, JobOutput  # noqa: I001, F401
    from mindtrace.jobs.mindtrace.types import JobType

    from mindtrace.jobs import Orchestrator, LocalClient

    # In-memory queues for testing
    orchestrator = Orchestrator(LocalClient())

    # Constructing a broker client does not connect: these run as written anywhere.
    from mindtrace.jobs import Orchestrator, RedisClient

    Orchestrator(RedisClient(host="redis.cluster.local", port=6379)).close()

    from mindtrace.jobs import Orchestrator, RabbitMQClient

    Orchestrator(RabbitMQClient(host="rabbitmq.cluster.local", port=5672, username="...", password="...")).close()

    class DetectionInput(JobInput):
        dataset: str

    # `DetectionSchema(input=DetectionInput(Datalake.dataset), output=None)` in the seed is pseudo-code.
    job = Job(
        id="detection_001",
        name="object_detection",
        job_type=JobType.OBJECT_DETECTION,
        payload=JobSchema(name="object_detection", input=DetectionInput(dataset="datalake://coco"), output=None),
        entrypoint="detect.py",
    )

    orchestrator.declare_queue("detection_jobs")
    orchestrator.publish("detection_jobs", job)

    # Monitor queue status
    count = orchestrator.count_queue_messages("detection_jobs")
    print(f"Pending jobs: {count}")
    assert count == 1

    # Clean completed jobs
    orchestrator.clean_queue("detection_jobs")
    assert orchestrator.count_queue_messages("detection_jobs") == 0

    # Auto-routing: publish(job) alone goes to QUEUE_MAPPING[job.job_type]
    orchestrator.publish(job)
    assert orchestrator.count_queue_messages("detection_jobs") == 1
    orchestrator.close()


def test_seed_001_basic_example() -> None:
    from mindtrace.jobs import Orchestrator, LocalClient, Consumer, JobSchema, JobInput, JobOutput, job_from_schema  # noqa: I001

    # Set up the orchestrator with local backend
    orchestrator = Orchestrator(LocalClient())

    # Define your job schema
    class ObjectDetectionInput(JobInput):
        image_path: str = "/default/path.jpg"

    class ObjectDetectionOutput(JobOutput):
        objects: list = []  # type: ignore[type-arg]

    schema = JobSchema(name="object_detection", input=ObjectDetectionInput(), output=ObjectDetectionOutput())
    orchestrator.register(schema)

    seen: list[str] = []

    # Create a consumer
    class ObjectDetection(Consumer):
        def run(self, job):  # type: ignore[no-untyped-def]
            seen.append(job.payload.input.image_path)  # "logic here"

    # Connect and consume jobs
    consumer = ObjectDetection("object_detection")
    consumer.connect(orchestrator)

    # Add a job to the queue
    job = job_from_schema(schema, ObjectDetectionInput(image_path="/path/to/image.jpg"))
    orchestrator.publish("object_detection", job)

    # Process jobs
    consumer.consume(num_messages=1)
    assert seen == ["/path/to/image.jpg"]
    assert orchestrator.count_queue_messages("object_detection") == 0
    orchestrator.close()


def _seed_001_on(backend: object) -> None:
    from mindtrace.jobs import Orchestrator, LocalClient, Consumer, JobSchema, JobInput, JobOutput, job_from_schema  # noqa: I001, F401

    class ObjectDetectionInput(JobInput):
        image_path: str = "/default/path.jpg"

    class ObjectDetectionOutput(JobOutput):
        objects: list = []  # type: ignore[type-arg]

    orchestrator = Orchestrator(backend)  # type: ignore[arg-type]
    schema = JobSchema(name="object_detection", input=ObjectDetectionInput(), output=ObjectDetectionOutput())
    orchestrator.register(schema)
    orchestrator.clean_queue("object_detection")
    seen: list[str] = []

    class ObjectDetection(Consumer):
        def run(self, job):  # type: ignore[no-untyped-def]
            seen.append(job.payload.input.image_path)
            self.stop()

    consumer = ObjectDetection("object_detection")
    consumer.connect(orchestrator)
    orchestrator.publish("object_detection", job_from_schema(schema, {"image_path": "/img.jpg"}))
    # As in the seed, consume() with no count runs until stopped (here: by the job itself).
    worker = threading.Thread(target=consumer.consume)
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    assert seen == ["/img.jpg"]
    assert orchestrator.receive_message("object_detection") is None
    orchestrator.delete_queue("object_detection")
    orchestrator.close()


def test_seed_001_redis_backend(redis_url: str) -> None:
    from mindtrace.jobs import RedisClient

    url = urlsplit(redis_url)
    if url.password or url.scheme != "redis":
        pytest.fail("the seed example takes host/port/db only; point MINDTRACE_JOBS_REDIS_URL at such a server")
    # Requires Redis server running
    redis_backend = RedisClient(host=url.hostname or "localhost", port=url.port or 6379, db=0)
    _seed_001_on(redis_backend)


def test_seed_001_rabbitmq_backend(amqp_url: str) -> None:
    from mindtrace.jobs import RabbitMQClient

    url = urlsplit(amqp_url)
    # Requires RabbitMQ server running
    rabbitmq_backend = RabbitMQClient(
        host=url.hostname or "localhost",
        port=url.port or 5672,
        username=url.username or "guest",
        password=url.password or "guest",
    )
    _seed_001_on(rabbitmq_backend)
