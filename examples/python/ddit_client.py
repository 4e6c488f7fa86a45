"""Submit one job to a ddit fleet and wait for its result: RabbitMQ (pika), Redis (redis-py) and S3
(boto3), nothing from ddit itself. The same contract any language can follow (README, "Any-language
client"): put the input image in S3, publish the job JSON to the work queue with publisher confirms,
then read `{prefix}:result:{job_id}` from Redis, woken by the `{prefix}:results` channel.

    pip install -r examples/python/requirements.txt
    python examples/python/ddit_client.py caption --image cat.png
    python examples/python/ddit_client.py vqa --image cat.png --question "what colour is the cat?"
    python examples/python/ddit_client.py generate --prompt "a red circle left of a blue square" --out out.png

Settings come from the same variables as the worker: DDIT_AMQP_URL, DDIT_QUEUE, DDIT_REDIS_URL,
DDIT_REDIS_PREFIX, DDIT_S3_ENDPOINT, DDIT_S3_BUCKET, DDIT_S3_PREFIX and the AWS_* credentials.
Prints the result JSON; exits 0 when the job succeeded, 1 when it failed, 2 on a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pika
import redis
from botocore.config import Config


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        sys.exit(f"ddit_client: set {name}")
    return value


def s3_client():
    endpoint = os.environ.get("DDIT_S3_ENDPOINT")
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        # Local S3 servers (Garage, MinIO) want path-style addressing.
        config=Config(s3={"addressing_style": "path" if endpoint else "auto"}),
    )


def upload(s3, image: Path, job_id: str) -> str:
    bucket = env("DDIT_S3_BUCKET")
    key = f"{env('DDIT_S3_PREFIX', 'ddit').strip('/')}/inputs/{job_id}/{image.name}"
    s3.upload_file(str(image), bucket, key)
    return f"s3://{bucket}/{key}"


def publish(job: dict) -> None:
    params = pika.URLParameters(env("DDIT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ch.confirm_delivery()  # basic_publish now raises unless the broker confirms
        ch.basic_publish(
            exchange="",
            routing_key=env("DDIT_QUEUE", "ddit.jobs"),
            body=json.dumps(job).encode(),
            properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            mandatory=True,  # raises UnroutableError if the queue does not exist
        )
    finally:
        conn.close()


def wait_result(r: redis.Redis, job_id: str, timeout: float) -> dict | None:
    prefix = env("DDIT_REDIS_PREFIX", "ddit")
    key = f"{prefix}:result:{job_id}"
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"{prefix}:results")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            # The result key is the source of truth; the channel only wakes us up early.
            body = r.get(key)
            if body is not None:
                return json.loads(body)
            pubsub.get_message(timeout=1.0)
        return None
    finally:
        pubsub.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=["caption", "vqa", "generate"])
    ap.add_argument("--image", type=Path, help="input image (caption, vqa)")
    ap.add_argument("--question", help="vqa question")
    ap.add_argument("--prompt", help="generate prompt")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--out", type=Path, help="generate: where to save the first image")
    ap.add_argument("--job-id", default=None, help="default: a fresh uuid")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the result")
    a = ap.parse_args()

    job_id = a.job_id or f"py-{uuid.uuid4().hex}"
    params: dict = {}
    s3 = s3_client()
    if a.task in ("caption", "vqa"):
        if a.image is None:
            ap.error(f"{a.task} needs --image")
        params["image"] = upload(s3, a.image, job_id)
    if a.task == "vqa":
        if not a.question:
            ap.error("vqa needs --question")
        params["question"] = a.question
    if a.task == "generate":
        if not a.prompt:
            ap.error("generate needs --prompt")
        params["prompt"] = a.prompt
    for name in ("seed", "steps"):
        if getattr(a, name) is not None:
            params[name] = getattr(a, name)
    job = {
        "job_id": job_id,
        "task": a.task,
        "params": params,
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    r = redis.Redis.from_url(env("DDIT_REDIS_URL", "redis://127.0.0.1:6379"))
    publish(job)
    result = wait_result(r, job_id, a.timeout)
    if result is None:
        print(f"ddit_client: no result for {job_id} within {a.timeout:.0f} s", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if result["status"] == "succeeded" and a.task == "generate" and a.out is not None:
        bucket, key = result["outputs"][0]["uri"].removeprefix("s3://").split("/", 1)
        s3.download_file(bucket, key, str(a.out))
    return 0 if result["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
