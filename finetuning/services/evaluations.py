"""Evaluations: a version scored next to the active version and the base model
on its snapshot's validation examples, then the promotion gate (services/promotion.py).

States: queued -> running -> succeeded | failed, each transition a conditional
update, as for jobs. A failed evaluation never activates anything.
"""

import functools
import logging
import time

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from finetuning.models import Evaluation, EvaluationScore, ModelVersion
from finetuning.scoring import Decoding, version_score, work_units
from finetuning.services.promotion import promotion_consider
from finetuning.services.snapshots import SnapshotError, snapshot_read
from finetuning.services.versions import base_version_name
from finetuning.services.workers import (
    BrokerUnavailable,
    Heartbeat,
    not_queued_fail,
    queued_recheck,
    stale_fail,
    task_publish,
    worker_name,
)

logger = logging.getLogger(__name__)

Status = Evaluation.Status
Role = EvaluationScore.Role


class EvaluationError(Exception):
    pass


class EvaluationNotQueued(EvaluationError, BrokerUnavailable):
    """The broker could not be reached to queue the evaluation: it is failed."""

    def __init__(self, message, *, evaluation_id):
        super().__init__(message)
        self.evaluation_id = evaluation_id


def evaluation_examples(*, version, limit=None):
    """The validation examples of the snapshot ``version`` was trained on, in snapshot
    order, at most ``limit`` (EVALUATION_MAX_EXAMPLES) of them."""
    limit = settings.EVALUATION_MAX_EXAMPLES if limit is None else limit
    if version.snapshot is None:
        raise EvaluationError(
            f"{version.name} was not trained here, so it has no validation split; score it on a file with "
            "`python manage.py evaluate --file`"
        )
    try:
        _, validation = snapshot_read(version.snapshot)
    except SnapshotError as exc:
        raise EvaluationError(str(exc)) from exc
    if not validation:
        raise EvaluationError(
            f"the data snapshot of {version.name} has no validation examples ({version.snapshot.note}); "
            "mark some examples validation, or score it on a file with `python manage.py evaluate --file`"
        )
    return validation[:limit]


def evaluation_time_limit(*, examples, versions, decoding):
    """Seconds an evaluation may run before Celery stops it: generous per token, as for jobs."""
    tokens = examples * versions * (decoding.max_new_tokens + 256)
    return int(settings.JOB_TIME_LIMIT_BASE_SECONDS + tokens * settings.JOB_TIME_LIMIT_SECONDS_PER_TOKEN)


def evaluation_start(*, version, requested_by=None):
    """Queue an evaluation of ``version`` on its validation examples; a worker runs it
    after commit. Raises EvaluationError before anything is queued, and
    EvaluationNotQueued when the broker cannot be reached (the evaluation is then failed)."""
    examples = evaluation_examples(version=version)
    decoding = Decoding.from_settings()
    try:
        with transaction.atomic():
            evaluation = Evaluation.objects.create(
                version=version,
                snapshot=version.snapshot,
                example_ids=[row["id"] for row in examples],
                samples=[
                    {"id": r["id"], "attributes": r["attributes"], "reference": r["description"]} for r in examples
                ],
                decoding=decoding.as_dict(),
                time_limit_seconds=evaluation_time_limit(examples=len(examples), versions=3, decoding=decoding),
                requested_by=requested_by,
            )
    except IntegrityError as exc:
        raise EvaluationError(f"{version.name} already has an evaluation queued or running") from exc
    # After commit, and at once when the caller holds no transaction, as for jobs.
    transaction.on_commit(functools.partial(_evaluation_publish, evaluation.pk, evaluation.time_limit_seconds))
    return evaluation


def evaluation_after_job(*, version_id):
    """Queue the automatic evaluation of a version a job just made. When it cannot
    run (no validation split), a failed evaluation says why on the version's page."""
    version = ModelVersion.objects.select_related("snapshot").get(pk=version_id)
    try:
        return evaluation_start(version=version)
    except EvaluationNotQueued as exc:  # failed already, saying why
        return Evaluation.objects.get(pk=exc.evaluation_id)
    except EvaluationError as exc:
        logger.warning("Version %s is not evaluated: %s", version.name, exc)
        return Evaluation.objects.create(
            version=version, snapshot=version.snapshot, status=Status.FAILED, error=str(exc), finished_at=timezone.now()
        )


def _evaluation_publish(evaluation_id, time_limit):
    from finetuning.tasks import evaluation_run

    try:
        task_publish(evaluation_run, pk=evaluation_id, time_limit=time_limit)
    except BrokerUnavailable as exc:
        if not not_queued_fail(Evaluation, evaluation_id, again="Evaluate again once the broker is back."):
            return  # the task got through after all, and a worker has the evaluation
        raise EvaluationNotQueued(
            f"the task broker is not reachable, so evaluation {evaluation_id} could not be queued; it is marked "
            "failed: try again in a minute",
            evaluation_id=evaluation_id,
        ) from exc


def _versions_to_score(evaluation):
    """[(role, version)]: this version, the active one now, and the base model it was made from."""
    roles = [(Role.CANDIDATE, evaluation.version)]
    active = ModelVersion.objects.filter(is_active=True).first()
    if active is not None:
        roles.append((Role.ACTIVE, active))
    base = ModelVersion.objects.filter(
        name=base_version_name(evaluation.version.base_model), kind=ModelVersion.Kind.BASE
    ).first()
    if base is not None:
        roles.append((Role.BASE, base))
    return roles


class _Progress:
    def __init__(self, evaluation_id, total):
        self.evaluation_id = evaluation_id
        self.total = total
        self.started = time.monotonic()
        self.last_write = 0.0

    def __call__(self, step):
        now = time.monotonic()
        if step < self.total and now - self.last_write < settings.JOB_PROGRESS_SECONDS:
            return
        self.last_write = now
        eta = (now - self.started) / step * (self.total - step) if step else None
        Evaluation.objects.filter(pk=self.evaluation_id).update(
            step=step, total_steps=self.total, progress=step / self.total, eta_seconds=eta, heartbeat_at=timezone.now()
        )


def evaluation_execute(*, evaluation_id):
    """Run a queued evaluation in this process, then the promotion gate. Returns the
    evaluation, or None if it was not ours to run."""
    now = timezone.now()
    claimed = Evaluation.objects.filter(pk=evaluation_id, status=Status.QUEUED).update(
        status=Status.RUNNING, started_at=now, heartbeat_at=now, worker=worker_name()
    )
    if not claimed:
        logger.info("Evaluation %s is not queued (gone, or taken by another worker); skipping", evaluation_id)
        return None
    evaluation = Evaluation.objects.select_related("version").get(pk=evaluation_id)
    with Heartbeat(Evaluation, evaluation_id):
        try:
            _score_all(evaluation)
        except Exception as exc:
            logger.exception("Evaluation %s failed", evaluation_id)
            Evaluation.objects.filter(pk=evaluation_id, status=Status.RUNNING).update(
                status=Status.FAILED, error=_describe(exc, evaluation), finished_at=timezone.now()
            )
            return Evaluation.objects.get(pk=evaluation_id)
    evaluation.refresh_from_db()
    if evaluation.status == Status.SUCCEEDED:
        promotion_consider(evaluation=evaluation)
    return evaluation


def _describe(exc, evaluation):
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        return f"stopped by its time limit of {evaluation.time_limit_seconds} s"
    if isinstance(exc, (EvaluationError, SnapshotError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _score_all(evaluation):
    if settings.TRAINING_TORCH_THREADS:
        import torch

        torch.set_num_threads(settings.TRAINING_TORCH_THREADS)
    roles = _versions_to_score(evaluation)
    examples = [{"attributes": s["attributes"], "description": s["reference"]} for s in evaluation.samples]
    decoding = Decoding.from_dict(evaluation.decoding)
    distinct = list({version.pk: version for _, version in roles}.values())
    per_version = work_units(examples)
    progress = _Progress(evaluation.pk, per_version * len(distinct))
    scores = {}
    for number, version in enumerate(distinct):
        scores[version.pk] = version_score(
            version, examples, decoding, on_progress=lambda done, offset=number * per_version: progress(offset + done)
        )
    with transaction.atomic():
        if not Evaluation.objects.filter(pk=evaluation.pk, status=Status.RUNNING).update(
            status=Status.SUCCEEDED, progress=1.0, eta_seconds=0, finished_at=timezone.now()
        ):
            return  # failed by the stale check meanwhile: its results are not trusted
        EvaluationScore.objects.bulk_create(
            EvaluationScore(
                evaluation=evaluation,
                version=version,
                role=role,
                metrics=scores[version.pk].metrics,
                outputs=scores[version.pk].outputs,
            )
            for role, version in roles
        )


def evaluations_reap_stale():
    """Fail running evaluations whose worker stopped beating; returns their ids."""
    return [evaluation.pk for evaluation in stale_fail(Evaluation, again="Evaluate again.")]


def evaluations_recheck_queued(*, worker_start=False):
    """The queued check of jobs (jobs_recheck_queued), for evaluations."""
    from finetuning.tasks import evaluation_run

    resent, failed = queued_recheck(Evaluation, evaluation_run, again="Evaluate again.", worker_start=worker_start)
    return resent, [evaluation.pk for evaluation in failed]
