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
version, and `dry_run` validates and reports what would happen without applying.
"""

from __future__ import annotations

import hashlib
import logging

from shared import subjects as s
from shared.api import PutJobRequest
from shared.codec import from_json, to_canonical_json, to_json, to_msgpack
from shared.durations import utcnow
from shared.ids import derived_id
from shared.errors import Conflict, Internal, InvalidInput, Poison, ShoalError, shown
from shared.models import ENDED_JOB_STATES, Evaluation, Job, JobSpec, JobState, JobVersion, SubmissionOutcome
from shared.store import Store
from shared.transport import Bus, Delivery
from shared.validation import check_namespace, validate_spec

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
SEQ_PREFIX = "seq-"  # submissions without a usable id are known by their stream sequence

def spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(to_canonical_json(spec)).hexdigest()


class Submissions:
    def __init__(self, bus: Bus, store: Store) -> None:
        self.bus = bus
        self.store = store

    async def handle(self, delivery: Delivery) -> None:
        namespace, submission_id, bad_id = self._identify(delivery)
        previous = await self.store.submissions.get(submission_id)
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
        )

    async def _upsert(self, namespace: str, submission_id: str, spec: JobSpec, digest: str,
                      force: bool) -> tuple[Job, bool]:
        """Create the job or its next version; returns (job, whether the spec changed)."""
        job_id = await self._job_id(namespace, spec.name, submission_id)
        for _ in range(50):
            now = utcnow()
            record = await self.store.jobs.get(s.job_key(namespace, job_id))
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

    async def _job_id(self, namespace: str, name: str, submission_id: str) -> str:
        existing = await self.store.job_id_by_name(namespace, name)
        if existing is not None:
            return existing
        job_id = derived_id("job", namespace, name, submission_id)
        try:
            await self.store.job_names.create(s.job_name_key(namespace, name), job_id.encode())
        except Conflict:
            existing = await self.store.job_id_by_name(namespace, name)
            if existing is None:
                raise InvalidInput(f"job name {name!r} is being deleted; try again", field="spec.name") from None
            return existing
        return job_id
