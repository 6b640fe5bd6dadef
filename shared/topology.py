"""Every stream and bucket the system uses, and one call that creates them all.

Each service calls `ensure(bus)` at start; creation is idempotent, so replicas and restarts are
harmless. The EVENTS stream is filled by the server itself from the job, execution and node buckets
(stream sourcing): every committed state change becomes an event with no second write that a crash
could lose, and the query service's view can be rebuilt by replaying it (once it has dropped events
older than its 30 days, a new view starts from the buckets' current state and follows it from there).
OUTPUT keeps only a tail of each execution's output: agents publish into it, the query service reads it.
"""

from __future__ import annotations

import dataclasses

from . import subjects as s
from .transport import BucketSpec, Bus, Source, StreamSpec

DAY = 86_400.0
# The server computes each job's partition from its namespace and id (tokens 1 and 2 of the key).
_PARTITION = f"{{{{partition({s.PARTITIONS},1,2)}}}}"
_W1, _W2 = "{{wildcard(1)}}", "{{wildcard(2)}}"
# Job output keeps the tail of each execution: its last 64 chunks (an agent ships at most 4 KiB in one),
# and at most 1 GiB in all, the oldest going first.
OUTPUT_CHUNKS_KEPT = 64
OUTPUT_MAX_BYTES = 1024 * 1024 * 1024
# Bytes of one message in SHOAL_OUTPUT at most (a chunk of 4 KiB, its msgpack envelope and room to spare):
# the server refuses a larger one, so a node cannot fill the stream with a few huge messages.
OUTPUT_MESSAGE_BYTES = 6 * 1024

STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(
        name=s.STREAM_SUBMISSIONS,
        subjects=(f"{s.SUBMIT_PREFIX}.*",),
        retention="workqueue",
        duplicate_window=600.0,
        description="Job submissions (JSON PutJobRequest); Nats-Msg-Id is the submission id",
    ),
    StreamSpec(
        name=s.STREAM_EVALS,
        subjects=(f"{s.EVAL_PREFIX}.*",),
        retention="workqueue",
        description="Evaluations waiting for the scheduler",
    ),
    StreamSpec(
        name=s.STREAM_PLANS,
        subjects=(f"{s.PLAN_PREFIX}.*",),
        retention="workqueue",
        description="Placement plans waiting for the rollout service",
    ),
    StreamSpec(
        name=s.STREAM_REPORTS,
        subjects=(f"{s.REPORT_PREFIX}.*",),
        retention="workqueue",
        max_age=7 * DAY,
        description="Execution state and health reports from agents",
    ),
    StreamSpec(
        name=s.STREAM_TIMERS,
        subjects=(f"{s.TIMER_PREFIX}.*",),
        retention="workqueue",
        description="Durable wake-ups for the rollout service, held back until due",
    ),
    StreamSpec(
        name=s.STREAM_ASSIGNMENTS,
        retention="limits",
        max_msgs_per_subject=1,
        msg_ttl=True,  # an archived execution's marker goes away here too
        description="The latest state of every execution by node (shoal.assign.<node>.<ns>.<job>.<execution>), "
                    "sourced from the executions bucket: agents read their own through consumers the services keep",
        sources=(Source(s.kv_stream(s.BUCKET_EXECUTIONS), f"$KV.{s.BUCKET_EXECUTIONS}.*.*.*.*",
                        f"{s.ASSIGN_PREFIX}.{{{{wildcard(3)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
                        f".{{{{wildcard(4)}}}}"),),
    ),
    StreamSpec(
        name=s.STREAM_DEAD,
        subjects=(f"{s.DEAD_PREFIX}.*",),
        retention="limits",
        max_age=14 * DAY,
        max_msgs=100_000,
        max_bytes=256 * 1024 * 1024,
        description="Dead letters: messages that failed max_attempts times, with their error (Shoal-Dead-* headers)",
    ),
    StreamSpec(
        name=s.STREAM_OUTPUT,
        subjects=(s.output("*", "*", "*", "*"),),
        retention="limits",
        max_age=7 * DAY,
        max_msgs_per_subject=OUTPUT_CHUNKS_KEPT,
        max_bytes=OUTPUT_MAX_BYTES,
        max_msg_size=OUTPUT_MESSAGE_BYTES,
        description="What each execution's command wrote (msgpack OutputChunk, at most 4 KiB each) on "
                    "shoal.output.<node>.<ns>.<job>.<execution>: the last 64 chunks of each, for 7 days",
    ),
    StreamSpec(
        name=s.STREAM_EVENTS,
        retention="limits",
        max_age=30 * DAY,
        description="Every change of a job, execution, rollout or node (msgpack), sourced from their buckets; "
                    "jobs, executions and rollouts by partition",
        sources=(
            Source(s.kv_stream(s.BUCKET_JOBS), f"$KV.{s.BUCKET_JOBS}.*.*", f"{s.EVENTS_JOB}.{_PARTITION}.{_W1}.{_W2}"),
            Source(s.kv_stream(s.BUCKET_EXECUTIONS), f"$KV.{s.BUCKET_EXECUTIONS}.*.*.*.*",
                   f"{s.EVENTS_EXECUTION}.{_PARTITION}.{_W1}.{_W2}.{{{{wildcard(3)}}}}.{{{{wildcard(4)}}}}"),
            Source(s.kv_stream(s.BUCKET_ROLLOUTS), f"$KV.{s.BUCKET_ROLLOUTS}.*.*",
                   f"{s.EVENTS_ROLLOUT}.{_PARTITION}.{_W1}.{_W2}"),
            Source(s.kv_stream(s.BUCKET_NODES), f"$KV.{s.BUCKET_NODES}.>", f"{s.EVENTS_NODE}.>"),
        ),
    ),
)

BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec(s.BUCKET_JOBS),
    BucketSpec(s.BUCKET_JOB_NAMES),
    BucketSpec(s.BUCKET_JOB_VERSIONS),
    BucketSpec(s.BUCKET_EVALUATIONS, ttl=7 * DAY),
    BucketSpec(s.BUCKET_EXECUTIONS, msg_ttl=True),  # archive markers go away (ARCHIVE_MARKER_TTL)
    BucketSpec(s.BUCKET_EXECUTIONS_ARCHIVE),
    BucketSpec(s.BUCKET_ROLLOUTS),
    BucketSpec(s.BUCKET_NODES),
    BucketSpec(s.BUCKET_SUBMISSIONS, ttl=DAY),
    BucketSpec(s.BUCKET_HEALTH),
    BucketSpec(s.BUCKET_LEASES, ttl=10.0),
    BucketSpec(s.BUCKET_CONFIG),
)


async def ensure(bus: Bus, *, replicas: int = 1) -> None:
    """Create every bucket, then every stream (EVENTS sources the buckets' streams), with `replicas`
    (SHOAL_JS_REPLICAS), and never fewer replicas than an existing one has."""
    for bucket in BUCKETS:
        await bus.ensure_bucket(dataclasses.replace(bucket, replicas=replicas))
    for stream in STREAMS:
        await bus.ensure_stream(dataclasses.replace(stream, replicas=replicas))
