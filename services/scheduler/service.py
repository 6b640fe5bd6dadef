"""The scheduler service: submissions in, evaluations through, plans out; and the stop endpoint."""

from __future__ import annotations

import cProfile
import datetime as dt
import os
import re
import uuid
from pathlib import Path

from shared import subjects as s
from shared.api import (
    DEFAULT_PAGE_SIZE,
    DeadLetter,
    GetSubmissionRequest,
    ListDeadLettersRequest,
    ListDeadLettersResponse,
    StopJobRequest,
    StopJobResponse,
    page_limit,
)
from shared.codec import from_json, to_json, to_msgpack
from shared.durations import utcnow
from shared.errors import InvalidInput, NotFound
from shared.models import Evaluation, Job, JobState
from shared.runtime import Component
from shared.store import Store
from shared.transport import (
    DEAD_ATTEMPTS,
    DEAD_CONSUMER,
    DEAD_ERROR,
    DEAD_SEQ,
    DEAD_SIZE,
    DEAD_SUBJECT,
    ApiRequest,
    ApiService,
    Consumer,
    ConsumerSpec,
    StoredMessage,
)
from shared.validation import check_namespace, check_token

from .evaluations import Evaluations, nodes_mirror, wanting_jobs_mirror
from .submissions import Submissions

VERSION = "0.1.0"
DEAD_LETTERS_PAGE = 200
SEQUENCE = re.compile(r"[1-9][0-9]{0,17}")  # a stream sequence, as dead-letter pages carry it
PREVIEW_BYTES = 512
EVALS_BATCH = 256  # evaluations taken in one fetch (and node joins decided together)
# A directory: the process runs under cProfile and writes scheduler-<pid>.prof there when it stops.
PROFILE_ENV = "SHOAL_SCHEDULER_PROFILE"


def _dead_letter(m: StoredMessage) -> DeadLetter:
    h = m.headers

    def number(name: str) -> int:
        value = h.get(name, "")
        return int(value) if value.isdigit() else 0

    return DeadLetter(seq=m.seq, stream=m.subject.rsplit(".", 1)[-1], subject=h.get(DEAD_SUBJECT, ""),
                      stream_seq=number(DEAD_SEQ), consumer=h.get(DEAD_CONSUMER, ""), attempts=number(DEAD_ATTEMPTS),
                      error=h.get(DEAD_ERROR, ""), at=dt.datetime.fromtimestamp(m.at, dt.timezone.utc),
                      size=number(DEAD_SIZE) or len(m.data),
                      preview=m.data[:PREVIEW_BYTES].decode("utf-8", errors="replace"))


class SchedulerService(Component):
    name = "scheduler"

    profiler: cProfile.Profile | None = None
    _profiling = False  # one profiler per process (one thread): the replicas of a process share it

    async def start(self) -> None:
        if os.environ.get(PROFILE_ENV) and not SchedulerService._profiling:
            SchedulerService._profiling = True
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        self.store = Store(self.bus)
        self.nodes = nodes_mirror(self.store)
        self.spawn(lambda: self.nodes.run(self.stopping), "watch-nodes")
        # Node joins read the jobs that want new nodes from here, not from a scan of every job.
        self.jobs = wanting_jobs_mirror(self.store)
        self.spawn(lambda: self.jobs.run(self.stopping), "watch-jobs")
        self.evaluations = evaluations = Evaluations(self.bus, self.store, self.nodes, self.jobs)
        submissions = Submissions(self.bus, self.store, self.nodes, evaluations=evaluations)

        await ApiService.start(self.bus, s.SERVICE_SCHEDULER, VERSION, "Job submission and scheduling",
                               queue_group=s.QUEUE_GROUP, endpoints=[
                                   ("jobs-stop", s.api("*", s.JOBS_STOP), self.stop_job),
                                   ("submissions-get", s.api("*", s.SUBMISSIONS_GET), self.get_submission),
                                   ("deadletters-list", s.DEAD_LETTERS_LIST, self.list_dead_letters),
                               ])

        await Consumer(
            self.bus, ConsumerSpec(stream=s.STREAM_SUBMISSIONS, durable=s.CONSUMER_SCHEDULER_SUBMISSIONS),
            concurrency=32,  # each submission waits on several JetStream round trips: overlap them
            on_dead=submissions.on_dead,
        ).start_single(submissions.handle)
        # A whole fetch at once, so that node joins arriving together make one plan per job (a fleet coming
        # back is a burst of them); job evaluations in it still run side by side.
        await Consumer(
            self.bus, ConsumerSpec(stream=s.STREAM_EVALS, durable=s.CONSUMER_SCHEDULER_EVALS), batch=EVALS_BATCH,
        ).start_batch(evaluations.handle_batch)

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            if self.profiler is not None:
                self.profiler.disable()
                self.profiler.dump_stats(Path(os.environ[PROFILE_ENV]) / f"scheduler-{os.getpid()}.prof")
                self.profiler = None
                SchedulerService._profiling = False

    async def stop_job(self, req: ApiRequest) -> bytes:
        namespace = check_namespace(req.token(2))
        body = from_json(req.data, StopJobRequest)
        record = await self.store.find_job(namespace, body.job)
        already = False

        def change(job: Job) -> bool:
            nonlocal already
            already = job.state.state_type == "stopped"
            if already:
                return False
            job.state = JobState(state_type="stopped", message=body.reason or "stopped by request")
            job.modified_at = utcnow()
            job.revision += 1
            return True

        written = await self.store.jobs.mutate(record.key, change)
        if written is None:
            raise NotFound(f"job {body.job!r} not found", field="job")
        job = written.value
        if already:
            return to_json(StopJobResponse(job_id=job.id, job_version=job.version, already_stopped=True))
        evaluation = Evaluation(id=str(uuid.uuid4()), namespace=namespace, job_id=job.id, job_version=job.version,
                                trigger="job-stop", created_at=utcnow())
        await self.store.evaluations.put(s.evaluation_key(namespace, evaluation.id), evaluation)
        await self.bus.js_publish(s.evaluation(namespace), to_msgpack(evaluation), msg_id=evaluation.id)
        return to_json(StopJobResponse(job_id=job.id, job_version=job.version, eval_id=evaluation.id))

    async def list_dead_letters(self, req: ApiRequest) -> bytes:
        """Dead letters, oldest first (`shoal dead-letters`): what was given up on, and why."""
        body = from_json(req.data, ListDeadLettersRequest)
        limit = page_limit(body.limit, default=DEFAULT_PAGE_SIZE, most=DEAD_LETTERS_PAGE)
        if body.next_token and not SEQUENCE.fullmatch(body.next_token):
            raise InvalidInput("next_token is malformed", field="next_token")
        start = int(body.next_token or 1)
        found = await self.bus.read_stream(s.STREAM_DEAD, f"{s.DEAD_PREFIX}.>", start, limit + 1)
        items = [_dead_letter(m) for m in found[:limit]]
        return to_json(ListDeadLettersResponse(items=items, next_token=str(found[limit].seq) if len(found) > limit else ""))

    async def get_submission(self, req: ApiRequest) -> bytes:
        namespace = check_namespace(req.token(2))
        body = from_json(req.data, GetSubmissionRequest)
        check_token(body.submission_id, "submission_id", "submission id")
        record = await self.store.submissions.get(body.submission_id)
        if record is None or record.value.namespace != namespace:
            raise NotFound(f"submission {body.submission_id!r} not found (not processed yet, or expired)",
                           field="submission_id")
        return to_json(record.value)
