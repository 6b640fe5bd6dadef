"""Job submissions: validate, version, evaluate, answer.

A submission is a JSON PutJobRequest published on `shoal.submit.<namespace>` and kept by the
SUBMISSIONS stream until this service acks it, so nothing accepted by the stream is lost. Processing
is idempotent by submission id (the `Nats-Msg-Id` header): a redelivery after a crash finds the version
it already created and the evaluation it already published, and answers the same outcome.

The submission id becomes a key and a subject token, so it is checked before anything else: 1-128
letters, digits, '_' and '-'. A submission with a bad id, or none, is known by its stream sequence
(`seq-<N>`, which the publisher has from its ack), and one with a bad id is rejected under that name
with an error naming the `Nats-Msg-Id` header. A namespace that is not even a subject token (too
long, say) cannot be answered on any subject: that message is a dead letter. A submission that keeps failing for another reason becomes a
dead letter after the consumer's attempts, and is answered with a 500 outcome.

Jobs are upserted by (namespace, name): a changed spec makes version + 1, an unchanged one is a 409
unless `force`, a job that has ended (stopped, completed, failed) is simply run again as a new
version, and `dry_run` validates and reports what would happen without applying: the nodes the
selector matches now (and, when it matches none, which requirement no ready node meets), the waves the
rollout would use, and the fields that change against the current version (`DryRunPlan`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from shared import metrics
from shared import subjects as s
from shared.api import PutJobRequest
from shared.codec import from_json, to_canonical_json, to_json, to_msgpack
from shared.durations import utcnow
from shared.ids import SEQ_PREFIX, derived_id
from shared.errors import Conflict, Internal, InvalidInput, Poison, ShoalError, shown
from shared.models import (
    ENDED_JOB_STATES,
    DryRunPlan,
    Evaluation,
    Job,
    JobSpec,
    JobState,
    JobVersion,
    Node,
    SubmissionOutcome,
)
from shared.plan import PLAN_NODE_IDS, explain_no_match, spec_changes
from shared.store import Mirror, Store
from shared.transport import Bus, Delivery
from shared.validation import check_namespace, validate_spec
from shared.waves import plan_waves

from .evaluations import Evaluations, NodeTable, candidates, compile_spec_selector, select

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"


def spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(to_canonical_json(spec)).hexdigest()


# -- dry runs: what a submission would do ----------------------------------------------------------


def dry_run_plan(spec: JobSpec, nodes: Mapping[str, Node], job: Job | None,
                 current: JobVersion | None) -> DryRunPlan:
    """What submitting `spec` would do with the fleet as `nodes` has it, against the current version."""
    selector = compile_spec_selector(spec)
    pool = candidates(selector, spec.selector.match_ids, nodes)
    targets = select(selector, pool)
    disconnected = sum(1 for node in pool if node.state.state_type != "ready" and selector.matches(node.id, node.labels))
    return DryRunPlan(
        ready_nodes=sum(1 for node in nodes.values() if node.state.state_type == "ready"),
        matched_nodes=len(targets),
        node_ids=targets[:PLAN_NODE_IDS],
        matched_disconnected=disconnected,
        no_match=[] if targets else explain_no_match(spec, nodes.values()),
        strategy=spec.rollout.strategy,
        waves=plan_waves(spec.rollout, len(targets)),
        current_version=job.version if job is not None else 0,
        current_state=job.state.state_type if job is not None else "",
        changes=spec_changes(current.spec, spec) if current is not None else [],
    )


def _count(outcome: SubmissionOutcome) -> None:
    """metrics: one submission answered for the first time (shoal_submissions_total)."""
    metrics.INSTRUMENTS.submission(outcome.accepted, outcome.error.code if outcome.error is not None else 200,
                                   outcome.dry_run)


class Submissions:
    def __init__(self, bus: Bus, store: Store, nodes: Mirror[Node] | None = None,
                 evaluations: Evaluations | None = None) -> None:
        self.bus = bus
        self.store = store
        # The scheduler's nodes mirror, for dry runs; without it a dry run reads the nodes bucket.
        self.nodes = nodes
        # With it, a job registered or updated is evaluated here, as its submission is handled (its plan
        # published at once); without it, the evaluation goes through the evaluations stream.
        self.evaluations = evaluations

    async def handle(self, delivery: Delivery) -> None:
        namespace, submission_id, bad_id = self._identify(delivery)
        previous = await self.store.submissions.get(submission_id)
        if previous is not None and previous.value.namespace != namespace:
            # Ids are kept across namespaces: this one is another namespace's (its outcome stays theirs).
            clash = Conflict(f"submission id {shown(submission_id)} was used by another submission; "
                             "use a new id", field=MSG_ID_HEADER, retryable=False)
            await self._announce(self._rejected(namespace, submission_id, clash))
            return
        if previous is not None:
            await self._announce(previous.value)
            return
        if bad_id is not None:
            outcome = self._rejected(namespace, submission_id, bad_id)
        else:
            try:
                outcome = await self._process(namespace, submission_id, delivery.data)
            except ShoalError as exc:
                if exc.retryable or isinstance(exc, Internal):
                    raise  # retried by the consumer, then a dead letter (on_dead answers it)
                outcome = self._rejected(namespace, submission_id, exc)
        await self.store.submissions.put(submission_id, outcome)
        _count(outcome)
        await self._announce(outcome)

    def _identify(self, delivery: Delivery) -> tuple[str, str, InvalidInput | None]:
        """(namespace, submission id, the id's problem if the publisher's id cannot be used)."""
        namespace = s.submit_namespace(delivery.subject)
        if not s.TOKEN.fullmatch(namespace):
            # Not even a subject token: there is no subject to answer on (an invalid namespace that is a
            # token is answered with a 400 by _process).
            raise Poison(f"submission on {shown(delivery.subject)}: the namespace is not a valid subject token")
        fallback = f"{SEQ_PREFIX}{delivery.stream_seq}"
        given = delivery.msg_id
        if not given:
            return namespace, fallback, None
        if not s.TOKEN.fullmatch(given) or given.startswith(SEQ_PREFIX):
            problem = InvalidInput(
                f"invalid submission id {shown(given)}: use 1-128 letters, digits, '_' and '-', starting with a "
                f"letter or digit and not with {SEQ_PREFIX!r}; this submission is known as {fallback}",
                field=MSG_ID_HEADER)
            return namespace, fallback, problem
        return namespace, given, None

    async def on_dead(self, delivery: Delivery, error: str) -> None:
        """A submission given up on is answered, so its sender does not wait for ever."""
        try:
            namespace, submission_id, _ = self._identify(delivery)
        except Poison:
            return  # no subject to answer on; the dead letter says why
        outcome = self._rejected(namespace, submission_id, Internal(f"submission could not be processed: {error}"))
        await self.store.submissions.put(submission_id, outcome)
        _count(outcome)
        await self._announce(outcome)

    def _rejected(self, namespace: str, submission_id: str, exc: ShoalError) -> SubmissionOutcome:
        return SubmissionOutcome(
            submission_id=submission_id, namespace=namespace, accepted=False, error=exc.body(), at=utcnow()
        )

    async def _announce(self, outcome: SubmissionOutcome) -> None:
        await self.bus.publish(s.submitted(outcome.namespace, outcome.submission_id), to_json(outcome))

    async def _process(self, namespace: str, submission_id: str, data: bytes) -> SubmissionOutcome:
        check_namespace(namespace, "namespace")
        request = from_json(data, PutJobRequest)
        warnings = validate_spec(request.spec, namespace)
        spec = request.spec
        digest = spec_hash(spec)
        if request.dry_run:
            return await self._dry_run(namespace, submission_id, spec, digest, request.force, warnings)
        job, created = await self._upsert(namespace, submission_id, spec, digest, request.force)
        if not created:
            warnings.append(f"spec unchanged; deployed again as version {job.version}")
        evaluation = Evaluation(
            id=derived_id("eval", submission_id),
            namespace=namespace,
            job_id=job.id,
            job_version=job.version,
            trigger="job-register" if job.version == 1 else "job-update",
            submission_id=submission_id,
            created_at=utcnow(),
        )
        await self.store.evaluations.put(s.evaluation_key(namespace, evaluation.id), evaluation)
        if self.evaluations is not None:
            await self.evaluations.place(evaluation, job)
        else:
            await self.bus.js_publish(s.evaluation(namespace), to_msgpack(evaluation), msg_id=evaluation.id)
        return SubmissionOutcome(
            submission_id=submission_id,
            namespace=namespace,
            accepted=True,
            job_id=job.id,
            job_version=job.version,
            eval_id=evaluation.id,
            warnings=warnings,
            at=utcnow(),
        )

    async def _dry_run(self, namespace: str, submission_id: str, spec: JobSpec, digest: str, force: bool,
                       warnings: list[str]) -> SubmissionOutcome:
        job_id = await self.store.job_id_by_name(namespace, spec.name)
        version = 1
        job: Job | None = None
        current: JobVersion | None = None
        if job_id is not None:
            record = await self.store.jobs.get(s.job_key(namespace, job_id))
            if record is not None:
                job = record.value
                current = await self.store.job_version(namespace, job.id, job.version)
                if current.spec_hash == digest and not force and job.state.state_type not in ENDED_JOB_STATES:
                    raise Conflict(f"job {spec.name!r} version {job.version} already has this spec; "
                                   "set force to apply it anyway", field="spec", retryable=False)
                version = job.version + 1
        return SubmissionOutcome(
            submission_id=submission_id,
            namespace=namespace,
            accepted=True,
            dry_run=True,
            job_id=job_id or "",
            job_version=version,
            warnings=warnings,
            at=utcnow(),
            plan=dry_run_plan(spec, await self._node_table(), job, current),
        )

    async def _node_table(self) -> Mapping[str, Node]:
        """The fleet as the scheduler sees it: its mirror when it has one, else a read of the bucket."""
        if self.nodes is not None:
            await self.nodes.wait_ready()
            return self.nodes.items
        return NodeTable({record.value.id: record.value for record in await self.store.nodes.scan()})

    async def _upsert(self, namespace: str, submission_id: str, spec: JobSpec, digest: str,
                      force: bool) -> tuple[Job, bool]:
        """Create the job or its next version; returns (job, whether the spec changed)."""
        job_id, fresh = await self._job_id(namespace, spec.name, submission_id)
        for attempt in range(50):
            now = utcnow()
            # A name this submission has just claimed has no job yet: the first attempt need not read it
            # (should one exist after all, its create conflicts and the next attempt reads it).
            record = None if fresh and not attempt else await self.store.jobs.get(s.job_key(namespace, job_id))
            if record is None:
                version_no, changed = 1, True
            else:
                job = record.value
                current = await self.store.job_version(namespace, job_id, job.version)
                if current.submission_id == submission_id:
                    return job, True  # a redelivery: this submission already made this version
                changed = current.spec_hash != digest
                if not changed and not force and job.state.state_type not in ENDED_JOB_STATES:
                    raise Conflict(f"job {spec.name!r} version {job.version} already has this spec; "
                                   "set force to apply it anyway", field="spec", retryable=False)
                version_no = job.version + 1
            version = JobVersion(job_id=job_id, namespace=namespace, name=spec.name, version=version_no, spec=spec,
                                 spec_hash=digest, created_at=now, submission_id=submission_id)
            vkey = s.job_version_key(namespace, job_id, version_no)
            try:
                await self.store.job_versions.create(vkey, version)
            except Conflict:
                existing = await self.store.job_versions.get(vkey)
                if existing is None or existing.value.submission_id != submission_id:
                    continue  # another submission took this version number; start over
            state = JobState(state_type="pending", message=f"version {version_no} submitted")
            if record is None:
                job = Job(id=job_id, name=spec.name, namespace=namespace, type=spec.type, version=version_no,
                          state=state, spec=spec, created_at=now, modified_at=now, revision=1)
                try:
                    await self.store.jobs.create(s.job_key(namespace, job_id), job)
                except Conflict:
                    continue
            else:
                job = record.value
                job.version = version_no
                job.type = spec.type
                job.spec = spec
                job.state = state
                job.modified_at = now
                job.revision += 1
                try:
                    await self.store.jobs.update(s.job_key(namespace, job_id), job, last=record.revision)
                except Conflict:
                    continue
            return job, changed or version_no == 1
        raise Internal(f"job {spec.name!r}: too many concurrent submissions")

    async def _job_id(self, namespace: str, name: str, submission_id: str) -> tuple[str, bool]:
        """The id of the job of this name, and whether this submission has just given the name its id."""
        existing = await self.store.job_id_by_name(namespace, name)
        if existing is not None:
            return existing, False
        job_id = derived_id("job", namespace, name, submission_id)
        try:
            await self.store.job_names.create(s.job_name_key(namespace, name), job_id.encode())
        except Conflict:
            existing = await self.store.job_id_by_name(namespace, name)
            if existing is None:
                raise InvalidInput(f"job name {name!r} is being deleted; try again", field="spec.name") from None
            return existing, False
        return job_id, True
