"""Consumer process of the cross-process tracing test (``python -m tests.jobs.tracing_worker URL QUEUE SPANS``).

Configures the global TracerProvider only (nothing instrumented by hand: the default hooks trace), runs one job
of the queue, and writes each span it ended to the file SPANS as a line of JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, from_url
from tests.jobs.conformance.flows import detection_of
from tests.jobs.conformance.models import DetectionOutput, image_schema


class JsonLinesExporter(SpanExporter):
    """Appends each span to a file as one JSON object: ids in hex, kind, parent, links, attributes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a") as out:
            for span in spans:
                context = span.get_span_context()
                assert context is not None
                out.write(
                    json.dumps(
                        {
                            "name": span.name,
                            "kind": span.kind.name,
                            "trace_id": f"{context.trace_id:032x}",
                            "span_id": f"{context.span_id:016x}",
                            "parent": None if span.parent is None else f"{span.parent.span_id:016x}",
                            "links": [f"{link.context.span_id:016x}" for link in span.links],
                            "attributes": dict(span.attributes or {}),
                        }
                    )
                    + "\n"
                )
        return SpanExportResult.SUCCESS


class Detector(AsyncConsumer):
    """Returns the job's expected detection."""

    async def run(self, job: Job) -> DetectionOutput:
        return detection_of(job)


async def main(args: argparse.Namespace) -> None:
    async with AsyncOrchestrator(from_url(args.url), state=args.state) as orchestrator:
        await orchestrator.register(image_schema(args.queue))
        consumer = Detector(args.queue)
        consumer.connect(orchestrator)
        await consumer.consume(num_messages=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("queue")
    parser.add_argument("spans", type=Path)
    parser.add_argument("--state", default=None, help="state store URL (default: the backend's own)")
    arguments = parser.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(arguments.spans)))
    trace.set_tracer_provider(provider)
    asyncio.run(main(arguments))
    provider.shutdown()
