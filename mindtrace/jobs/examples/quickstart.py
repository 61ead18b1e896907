"""The README quickstart: a typed job through the blocking API on the in-memory backend."""

from mindtrace.jobs import Consumer, Job, JobInput, JobOutput, JobSchema, LocalClient, Orchestrator, job_from_schema


class ObjectDetectionInput(JobInput):
    image_path: str = "/default/path.jpg"


class ObjectDetectionOutput(JobOutput):
    objects: list[str] = []


class ObjectDetection(Consumer):
    def run(self, job: Job) -> ObjectDetectionOutput:
        print("detecting in", job.input_as(ObjectDetectionInput).image_path)
        return ObjectDetectionOutput(objects=["cat"])


orchestrator = Orchestrator(LocalClient())
schema = JobSchema(name="object_detection", input=ObjectDetectionInput, output=ObjectDetectionOutput)
orchestrator.register(schema)  # declares the queue "object_detection"

consumer = ObjectDetection("object_detection")
consumer.connect(orchestrator)

job = job_from_schema(schema, ObjectDetectionInput(image_path="/path/to/image.jpg"))
orchestrator.publish("object_detection", job)
consumer.consume(num_messages=1)
print("pending:", orchestrator.count_queue_messages("object_detection"))
orchestrator.close()
