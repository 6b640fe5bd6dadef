"""Evaluations: decide which nodes a job version should run on, and hand that plan to the rollout service.

Triggers: a job registered or updated (place it on every ready node its selector matches), a job
stopped, or a node that joined or came back (give it every running pipeline and config job it
matches, and let queued jobs of any type start). The scheduler only decides *where*; the rollout
service decides *when* (waves) and writes executions.
"""

from __future__ import annotations

import logging

from shared import subjects as s
from shared.codec import decode_message, to_msgpack
from shared.durations import utcnow
from shared.models import DAEMON_JOB_TYPES, Evaluation, Job, JobSpec, Node, Plan
from shared.selector import compile_selector
from shared.store import Mirror, Store
from shared.transport import Bus, Delivery

log = logging.getLogger(__name__)

# Job states in which a newly joined node should get the job.
ACTIVE_JOB_STATES = frozenset(
    {"pending", "deploying", "running", "degraded", "rollout_paused", "rollout_failed", "completed"}
)


def eligible_nodes(spec: JobSpec, nodes: dict[str, Node]) -> list[str]:
    """Ready nodes matching the job's selector, sorted by id (a stable order for waves)."""
    sel = spec.selector
    selector = compile_selector(sel.match_labels, sel.match_expressions, sel.match_ids)
    return sorted(
        node.id for node in nodes.values()
        if node.state.state_type == "ready" and selector.matches(node.id, node.labels)
    )


def wants_new_node(job: Job) -> bool:
    """Queued jobs of any type, and pipeline and config jobs that are deployed (a config push that has
    completed everywhere still belongs on a node that joins later; a failed rollout's rollback too)."""
    state = job.state.state_type
    if state == "queued":
        return True
    return job.type in DAEMON_JOB_TYPES and state in ACTIVE_JOB_STATES


class Evaluations:
    def __init__(self, bus: Bus, store: Store, nodes: Mirror[Node]) -> None:
        self.bus = bus
        self.store = store
        self.nodes = nodes

    async def handle(self, delivery: Delivery) -> None:
        evaluation = decode_message(delivery.data, Evaluation, f"evaluation on {delivery.subject}")
        await self.nodes.wait_ready()
        if evaluation.trigger == "node-join":
            await self._node_joined(evaluation)
        elif evaluation.trigger == "job-stop":
            await self._plan(evaluation, "stop", [], "job stopped")
        else:
            await self._job_changed(evaluation)

    async def _job_changed(self, evaluation: Evaluation) -> None:
        record = await self.store.jobs.get(s.job_key(evaluation.namespace, evaluation.job_id))
        if record is None:
            log.info("evaluation %s: job %s is gone", evaluation.id, evaluation.job_id)
            return
        job = record.value
        if job.version != evaluation.job_version:
            log.info("evaluation %s is for version %d, job is at %d: superseded",
                     evaluation.id, evaluation.job_version, job.version)
            return
        targets = eligible_nodes(job.spec, self.nodes.items)
        await self._plan(evaluation, "deploy", targets, f"{len(targets)} eligible nodes")

    async def _node_joined(self, evaluation: Evaluation) -> None:
        # Read the node itself: the mirror may not have seen the write that triggered this evaluation yet.
        record = await self.store.nodes.get(evaluation.node_id)
        node = record.value if record is not None else None
        if node is None or node.state.state_type != "ready":
            return
        single = {node.id: node}
        for record in await self.store.jobs.scan(">"):
            job = record.value
            if not wants_new_node(job) or not eligible_nodes(job.spec, single):
                continue
            plan = Plan(eval_id=evaluation.id, namespace=job.namespace, job_id=job.id, job_version=job.version,
                        kind="add-nodes", node_ids=[node.id], reason=f"node {node.id} joined", created_at=utcnow())
            await self.bus.js_publish(s.plan(job.namespace), to_msgpack(plan), msg_id=f"{evaluation.id}:{job.id}")

    async def _plan(self, evaluation: Evaluation, kind: str, node_ids: list[str], reason: str) -> None:
        plan = Plan(eval_id=evaluation.id, namespace=evaluation.namespace, job_id=evaluation.job_id,
                    job_version=evaluation.job_version, kind=kind, node_ids=node_ids,  # type: ignore[arg-type]
                    reason=reason, created_at=utcnow())
        await self.bus.js_publish(s.plan(evaluation.namespace), to_msgpack(plan), msg_id=evaluation.id)
