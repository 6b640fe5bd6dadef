"""Every NATS subject, stream, consumer and key-value bucket name, in one place.

Naming scheme: `shoal.<area>.<...>`. Public request-reply API lives under `shoal.v1.<namespace>.<noun>.<verb>`
with the namespace as its own token, so NATS permissions can later confine a tenant to
`shoal.v1.<its namespace>.>`. Tokens that come from users (namespace, job id, node id) are validated
against `TOKEN` before they are ever put in a subject.
"""

from __future__ import annotations

import hashlib
import json
import re

# A subject token or key-value key token taken from user input: no dots, no wildcards, no spaces.
TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")

ROOT = "shoal"
API = f"{ROOT}.v1"

# --- public API (JSON), request-reply through the NATS Services API -----------------------------
SERVICE_SCHEDULER = "shoal-scheduler"
SERVICE_ROLLOUT = "shoal-rollout"
SERVICE_HEALTH = "shoal-health"
SERVICE_QUERY = "shoal-query"
QUEUE_GROUP = "shoal"
SERVICES = (SERVICE_SCHEDULER, SERVICE_ROLLOUT, SERVICE_HEALTH, SERVICE_QUERY)


def service_ping(service: str) -> str:
    """The NATS Services API discovery subject: any running instance of `service` answers."""
    return f"$SRV.PING.{service}"


def api(namespace: str, operation: str) -> str:
    """`shoal.v1.<namespace>.executions.list` and friends; `namespace` may be `*` for an endpoint."""
    return f"{API}.{namespace}.{operation}"


EXECUTIONS_LIST = "executions.list"
EXECUTIONS_GET = "executions.get"
EXECUTIONS_LOGS = "executions.logs"
JOBS_GET = "jobs.get"
JOBS_LIST = "jobs.list"
JOBS_STOP = "jobs.stop"
ROLLOUT_STATUS = "rollouts.status"
ROLLOUT_PROMOTE = "rollouts.promote"
ROLLOUT_PAUSE = "rollouts.pause"
ROLLOUT_RESUME = "rollouts.resume"
ROLLOUT_ABORT = "rollouts.abort"
SUBMISSIONS_GET = "submissions.get"

# Cluster-wide (not namespaced) API.
NODES_LIST = f"{API}.nodes.list"
NODES_REGISTER = f"{API}.nodes.register"
DEAD_LETTERS_LIST = f"{API}.deadletters.list"
FLEETS_PREFIX = f"{API}.fleets"
FLEETS_OPEN_PREFIX = f"{FLEETS_PREFIX}.open"
# Tokens after `shoal.v1.` that are cluster-wide APIs: no namespace may have these names.
RESERVED_NAMESPACES = frozenset({NODES_LIST.split(".")[2], DEAD_LETTERS_LIST.split(".")[2],
                                 FLEETS_PREFIX.split(".")[2]})


# --- the edge protocol: every subject an agent uses names its node, so permissions can confine it ---
DIGEST_CHARS = 16


def labels_digest(labels: dict[str, str]) -> str:
    """The last token of a registration subject: the first 16 hex characters of the SHA-256 of the labels
    as JSON with sorted keys and no spaces (`{}` for none). A node identity that pins its labels may
    publish on its own digest only, so it cannot claim other labels."""
    canonical = json.dumps(labels, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_CHARS]


def node_register(node_id: str, digest: str) -> str:
    """`shoal.v1.nodes.register.<node id>.<labels digest>` (a permission may use `*` as the digest)."""
    return f"{NODES_REGISTER}.{node_id}.{digest}"


HEARTBEAT_PREFIX = f"{ROOT}.heartbeat"


def heartbeat(node_id: str) -> str:
    """Agents publish heartbeats here (core NATS); every health replica listens to all of them."""
    return f"{HEARTBEAT_PREFIX}.{node_id}"


FLEET_HEARTBEAT_PREFIX = f"{ROOT}.fleetbeat"


def fleet_heartbeat(fleet: str) -> str:
    """A simulated fleet's heartbeats, many nodes to a message (core NATS; only a fleet identity may send)."""
    return f"{FLEET_HEARTBEAT_PREFIX}.{fleet}"


def fleet_open(fleet: str) -> str:
    """A simulated fleet asks here for its consumer of its nodes' assignments."""
    return f"{FLEETS_OPEN_PREFIX}.{fleet}"


ASSIGN_PREFIX = f"{ROOT}.assign"
STREAM_ASSIGNMENTS = "SHOAL_ASSIGNMENTS"
ASSIGN_CONSUMER_PREFIX = "assign-"
FLEET_CONSUMER_PREFIX = f"{ASSIGN_CONSUMER_PREFIX}fleet-"
# A node named `fleet-x` would own `assign-fleet-x`, fleet x's consumer of its nodes' assignments.
RESERVED_NODE_PREFIX = FLEET_CONSUMER_PREFIX[len(ASSIGN_CONSUMER_PREFIX):]


def assignments(node_id: str) -> str:
    """The latest state of every execution on one node: `shoal.assign.<node>.<ns>.<job>.<execution>`."""
    return f"{ASSIGN_PREFIX}.{node_id}.>"


def assign_consumer(node_id: str) -> str:
    """The durable pull consumer the health service keeps for one node's assignments."""
    return f"{ASSIGN_CONSUMER_PREFIX}{node_id}"


def fleet_consumer(fleet: str) -> str:
    return f"{FLEET_CONSUMER_PREFIX}{fleet}"


def pull_next(consumer: str) -> str:
    """The one JetStream API subject an agent uses: fetch the next messages of its own consumer."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{STREAM_ASSIGNMENTS}.{consumer}"


def ack(consumer: str) -> str:
    """Acks of messages delivered by `consumer`."""
    return f"$JS.ACK.{STREAM_ASSIGNMENTS}.{consumer}.>"


# --- job output (msgpack OutputChunk): what each execution's command wrote, kept as a tail ------------
OUTPUT_PREFIX = f"{ROOT}.output"
STREAM_OUTPUT = "SHOAL_OUTPUT"


def output(node_id: str, namespace: str, job_id: str, execution_id: str) -> str:
    """Where an agent publishes one execution's output: `shoal.output.<node>.<ns>.<job>.<execution>`."""
    return f"{OUTPUT_PREFIX}.{node_id}.{namespace}.{job_id}.{execution_id}"


def output_of_node(node_id: str) -> str:
    """Every output subject of one node (a node identity may publish these only; `*`: any node's)."""
    return f"{OUTPUT_PREFIX}.{node_id}.>"


def output_filter(namespace: str, job_id: str, node_id: str = "*", execution_id: str = "*") -> str:
    """The output of a job's executions, optionally of one node or one execution."""
    return output(node_id, namespace, job_id, execution_id)


def output_parts(subject: str) -> tuple[str, str, str, str]:
    """(node, namespace, job id, execution id) of an output subject."""
    _, _, node_id, namespace, job_id, execution_id = subject.split(".", 5)
    return node_id, namespace, job_id, execution_id

# --- job submission (JSON PutJobRequest, captured by the SUBMISSIONS stream) ----------------------
SUBMIT_PREFIX = f"{ROOT}.submit"


def submit(namespace: str) -> str:
    return f"{SUBMIT_PREFIX}.{namespace}"


def submit_namespace(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


SUBMITTED_PREFIX = f"{ROOT}.submitted"


def submitted(namespace: str, submission_id: str) -> str:
    """Where the outcome of one submission is published (core NATS; also kept in the SUBMISSIONS bucket)."""
    return f"{SUBMITTED_PREFIX}.{namespace}.{submission_id}"


# --- internal work (msgpack, work-queue streams shared by replicas) --------------------------------
EVAL_PREFIX = f"{ROOT}.eval"
PLAN_PREFIX = f"{ROOT}.plan"
REPORT_PREFIX = f"{ROOT}.report"
TIMER_PREFIX = f"{ROOT}.timer"


def evaluation(namespace: str) -> str:
    return f"{EVAL_PREFIX}.{namespace}"


NODE_EVAL = f"{EVAL_PREFIX}._node"  # node joined or came back: not tied to one namespace


def plan(namespace: str) -> str:
    return f"{PLAN_PREFIX}.{namespace}"


def timer(namespace: str) -> str:
    """Durable wake-ups (restart backoff, queue and total timeouts), delivered when due."""
    return f"{TIMER_PREFIX}.{namespace}"


def report(node_id: str) -> str:
    """Agents publish execution state reports and health counters here."""
    return f"{REPORT_PREFIX}.{node_id}"


# --- dead letters: messages that failed max_attempts times, with their error (headers Shoal-Dead-*) --
DEAD_PREFIX = f"{ROOT}.dead"


def dead_letter(stream: str) -> str:
    return f"{DEAD_PREFIX}.{stream}"


# --- events (msgpack): every change of a job, execution or node, sourced from the buckets ----------
EVENTS_PREFIX = f"{ROOT}.events"
EVENTS_EXECUTION = f"{EVENTS_PREFIX}.execution"
EVENTS_JOB = f"{EVENTS_PREFIX}.job"
EVENTS_NODE = f"{EVENTS_PREFIX}.node"
EVENTS_ROLLOUT = f"{EVENTS_PREFIX}.rollout"
# Events of jobs, executions and rollouts carry a partition token after their kind, computed by the
# server from the namespace and job id (`shoal.events.execution.<partition>.<ns>.<job>.<node>.<exec>`):
# one rollout replica owns each partition, so every event of a job reaches the one replica that holds
# the job's state in memory. Fixed: changing it would move jobs between partitions.
PARTITIONS = 16


def partition_filter(partition: int) -> str:
    """The one filter subject of a partition's events: its executions, jobs and rollouts
    (`shoal.events.<kind>.<partition>.>`). Node events (`shoal.events.node.<node id>`, a node id has no
    dot) are too short to match. One subject, not one per kind: nats-server finds the next message of a
    consumer with several filter subjects by intersecting them with every subject of a message block,
    which cost it half its CPU in a 10,000-node rolling update (each execution event has a subject of its
    own); a single wildcard filter is matched message by message."""
    return f"{EVENTS_PREFIX}.*.{partition}.>"


def event_job(subject: str) -> tuple[str, str]:
    """(namespace, job id) of a job, rollout or execution event (read from the end of the subject, so
    that events written before partitions existed read the same)."""
    tokens = subject.split(".")
    if subject.startswith(EVENTS_EXECUTION + "."):
        return tokens[-4], tokens[-3]
    return tokens[-2], tokens[-1]


def consumer_rollout_partition(partition: int) -> str:
    return f"rollout-p{partition}"


ROLLOUT_LEASE_PREFIX = "rollout"  # shoal_leases keys: rollout.partition.<k>, rollout.member.<replica id>

# --- streams ---------------------------------------------------------------------------------------
STREAM_SUBMISSIONS = "SHOAL_SUBMISSIONS"
STREAM_EVALS = "SHOAL_EVALS"
STREAM_PLANS = "SHOAL_PLANS"
STREAM_REPORTS = "SHOAL_REPORTS"
STREAM_EVENTS = "SHOAL_EVENTS"
STREAM_TIMERS = "SHOAL_TIMERS"
STREAM_DEAD = "SHOAL_DEAD"

# --- durable consumers (one name per role, shared by all replicas of that role) --------------------
CONSUMER_SCHEDULER_SUBMISSIONS = "scheduler-submissions"
CONSUMER_SCHEDULER_EVALS = "scheduler-evals"
CONSUMER_ROLLOUT_PLANS = "rollout-plans"
CONSUMER_ROLLOUT_TIMERS = "rollout-timers"
CONSUMER_HEALTH_REPORTS = "health-reports"



# --- key-value buckets -----------------------------------------------------------------------------
BUCKET_JOBS = "shoal_jobs"  # <ns>.<job_id> -> Job
BUCKET_JOB_NAMES = "shoal_job_names"  # <ns>.<name> -> job id
BUCKET_JOB_VERSIONS = "shoal_job_versions"  # <ns>.<job_id>.<version> -> JobVersion
BUCKET_EVALUATIONS = "shoal_evaluations"  # <ns>.<eval_id> -> Evaluation
BUCKET_EXECUTIONS = "shoal_executions"  # <ns>.<job_id>.<node_id>.<exec_id> -> Execution
# Executions that ended and were superseded, moved out of BUCKET_EXECUTIONS (same keys): history that no
# decision reads, still listed by the query view.
BUCKET_EXECUTIONS_ARCHIVE = "shoal_executions_archive"
BUCKET_ROLLOUTS = "shoal_rollouts"  # <ns>.<job_id> -> Rollout
BUCKET_NODES = "shoal_nodes"  # <node_id> -> Node
BUCKET_SUBMISSIONS = "shoal_submissions"  # <submission_id> -> SubmissionOutcome
BUCKET_HEALTH = "shoal_health"  # <ns>.<job_id>.<node_id>.<exec_id> -> HealthWindow
BUCKET_LEASES = "shoal_leases"  # <name> -> holder (leader leases, expire by bucket TTL)
BUCKET_CONFIG = "shoal_config"  # cluster-wide settings shared by replicas (page-token key)


# The header of the delete marker that moves an execution to the archive: readers of the executions
# bucket's events (the query view, a rollout's memory of the job) tell it from a deletion.
ARCHIVED_HEADER = "Shoal-Archived"
# How long that marker stays in the executions bucket (streams sourced from it keep their copy): long
# enough for every source to have copied it, short enough that scans of a job do not grow with history.
ARCHIVE_MARKER_TTL = 600.0


def archived(headers: dict[str, str] | None) -> bool:
    """Whether an executions-bucket delete marker moved its execution to the archive."""
    return headers is not None and ARCHIVED_HEADER in headers


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def job_key(namespace: str, job_id: str) -> str:
    return f"{namespace}.{job_id}"


def job_name_key(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


def job_version_key(namespace: str, job_id: str, version: int) -> str:
    return f"{namespace}.{job_id}.{version}"


def evaluation_key(namespace: str, eval_id: str) -> str:
    return f"{namespace}.{eval_id}"


def execution_key(namespace: str, job_id: str, node_id: str, execution_id: str) -> str:
    return f"{namespace}.{job_id}.{node_id}.{execution_id}"


def executions_of_job(namespace: str, job_id: str) -> str:
    return f"{namespace}.{job_id}.>"


def executions_of_node(node_id: str) -> str:
    return f"*.*.{node_id}.*"


def rollout_key(namespace: str, job_id: str) -> str:
    return f"{namespace}.{job_id}"
