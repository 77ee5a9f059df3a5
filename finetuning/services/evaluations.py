"""Evaluations: a version scored next to the active version and the base model
on its snapshot's validation examples, then the promotion gate (services/promotion.py).

States: queued -> running -> succeeded | failed | cancelled, each transition a
conditional update, as for jobs. Only a succeeded evaluation reaches the gate.
Evaluations have a queue and a worker of their own ("evaluation"), so that an automatic
evaluation never holds a curator's training job back. While queued, a curator may
size one (examples, max new tokens) or cancel it; a running one stops at the next
example when cancelled, and nothing of it is kept but the row saying so.
"""

import dataclasses
import functools
import logging

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from finetuning.models import Evaluation, EvaluationScore, ModelVersion
from finetuning.scoring import Decoding, version_score, work_units
from finetuning.selectors import SnapshotError, base_version_get, fact_vocabulary, snapshot_read
from finetuning.services.promotion import promotion_consider
from finetuning.services.workers import (
    BrokerUnavailable,
    CancelCheck,
    Heartbeat,
    ProgressMeter,
    queued_recheck,
    seconds_per_step_prior,
    stale_fail,
    task_publish,
    work_cancel,
    work_claim,
    work_publish,
    work_time_limit,
)

logger = logging.getLogger(__name__)

Status = Evaluation.Status
Role = EvaluationScore.Role


class EvaluationError(Exception):
    pass


class EvaluationSizeError(EvaluationError):
    """A size a curator asked for is out of range: ``errors`` maps each field to the reason."""

    def __init__(self, errors):
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in errors.items()))
        self.errors = errors


class EvaluationCancelled(Exception):
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
    return work_time_limit(tokens=examples * versions * (decoding.max_new_tokens + 256))


def _size_fields(version, examples, decoding):
    """The fields of an evaluation that follow from its size: what it scores and how long it may take."""
    versions = len(_distinct(_versions_to_score(version)))
    return {
        "example_ids": [row["id"] for row in examples],
        "samples": [{"id": r["id"], "attributes": r["attributes"], "reference": r["description"]} for r in examples],
        "decoding": decoding.as_dict(),
        "fact_terms": fact_vocabulary(),
        # examples x versions: what its progress counts; the queue's estimates need it before it runs.
        "total_steps": len(examples) * versions,
        "time_limit_seconds": evaluation_time_limit(examples=len(examples), versions=versions, decoding=decoding),
    }


def _size_check(*, version, examples, max_new_tokens, fact_guard=None, decoding=None):
    """(validation examples to score, decoding) for the size asked, or EvaluationSizeError naming each bad field.
    ``decoding``: the settings to size (default: today's, Decoding.from_settings)."""
    available = evaluation_examples(version=version, limit=10**9)
    errors = {}
    if examples is not None and not 1 <= examples <= len(available):
        errors["examples"] = f"must be between 1 and {len(available)} (the validation examples of {version.name})"
    if max_new_tokens is not None and not 1 <= max_new_tokens <= settings.GENERATE_MAX_NEW_TOKENS:
        errors["max_new_tokens"] = f"must be between 1 and {settings.GENERATE_MAX_NEW_TOKENS} (GENERATE_MAX_NEW_TOKENS)"
    if errors:
        raise EvaluationSizeError(errors)
    decoding = decoding or Decoding.from_settings()
    if max_new_tokens is not None:
        decoding = dataclasses.replace(decoding, max_new_tokens=max_new_tokens)
    if fact_guard is not None:
        decoding = dataclasses.replace(decoding, fact_guard=fact_guard)
    return available[: settings.EVALUATION_MAX_EXAMPLES if examples is None else examples], decoding


def evaluation_start(
    *, version, requested_by=None, automatic=False, examples=None, max_new_tokens=None, fact_guard=None
):
    """Queue an evaluation of ``version`` on its validation examples (the first ``examples``,
    EVALUATION_MAX_EXAMPLES by default); a worker of the evaluation queue runs it after
    commit. Raises EvaluationError before anything is queued, and EvaluationNotQueued when
    the broker cannot be reached (the evaluation is then failed). ``automatic``: started by
    a finished job rather than by a curator. ``fact_guard``: generate with the fact guard on or
    off (None: EVALUATION_FACT_GUARD)."""
    rows, decoding = _size_check(
        version=version, examples=examples, max_new_tokens=max_new_tokens, fact_guard=fact_guard
    )
    try:
        with transaction.atomic():
            evaluation = Evaluation.objects.create(
                version=version,
                snapshot=version.snapshot,
                automatic=automatic,
                requested_by=requested_by,
                **_size_fields(version, rows, decoding),
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
        return evaluation_start(version=version, automatic=True)
    except EvaluationNotQueued as exc:  # failed already, saying why
        return Evaluation.objects.get(pk=exc.evaluation_id)
    except EvaluationError as exc:
        logger.warning("Version %s is not evaluated: %s", version.name, exc)
        return Evaluation.objects.create(
            version=version,
            snapshot=version.snapshot,
            automatic=True,
            status=Status.FAILED,
            error=str(exc),
            finished_at=timezone.now(),
        )


def evaluation_resize(*, evaluation, examples, max_new_tokens):
    """Change how many examples a queued evaluation scores and how many tokens each output
    may have; its time limit follows. Raises EvaluationSizeError naming each bad field, and
    EvaluationError once it has started. A larger time limit needs its task sent again (the
    limit travels with the task): the message sent before is then left alone by the claim."""
    version = evaluation.version
    rows, decoding = _size_check(
        version=version,
        examples=examples,
        max_new_tokens=max_new_tokens,
        decoding=Decoding.from_dict(evaluation.decoding),  # as it was started
    )
    fields = _size_fields(version, rows, decoding)
    grew = fields["time_limit_seconds"] > evaluation.time_limit_seconds
    with transaction.atomic():
        if not Evaluation.objects.filter(pk=evaluation.pk, status=Status.QUEUED).update(
            **fields, **({"enqueued_at": timezone.now()} if grew else {})
        ):
            evaluation.refresh_from_db()
            raise EvaluationError(f"evaluation {evaluation.pk} has {evaluation.status}: only a queued one can be sized")
        if grew:
            transaction.on_commit(functools.partial(_evaluation_resend, evaluation.pk, fields["time_limit_seconds"]))
    evaluation.refresh_from_db()
    return evaluation


def _evaluation_resend(evaluation_id, time_limit):
    from finetuning.tasks import evaluation_run

    try:
        task_publish(evaluation_run, pk=evaluation_id, time_limit=time_limit)
    except BrokerUnavailable:
        # Still queued: the queued check sends it again once the broker answers.
        logger.warning("Evaluation %s was sized but its task could not be sent again yet", evaluation_id)


def evaluation_cancel(*, evaluation):
    """Cancel a queued evaluation at once, or ask a running one to stop at its next example
    (nothing of it is kept). Raises EvaluationError if it has already finished."""
    cancelled = work_cancel(Evaluation, evaluation.pk, before_start="cancelled before it started")
    evaluation.refresh_from_db()
    if not cancelled and evaluation.status in Evaluation.FINISHED:
        raise EvaluationError(f"evaluation {evaluation.pk} has already {evaluation.status}")
    return evaluation


def _evaluation_publish(evaluation_id, time_limit):
    from finetuning.tasks import evaluation_run

    try:
        work_publish(
            Evaluation,
            evaluation_run,
            pk=evaluation_id,
            time_limit=time_limit,
            again="Evaluate again once the broker is back.",
        )
    except BrokerUnavailable as exc:
        raise EvaluationNotQueued(
            f"the task broker is not reachable, so evaluation {evaluation_id} could not be queued; it is marked "
            "failed: try again in a minute",
            evaluation_id=evaluation_id,
        ) from exc


def _versions_to_score(version):
    """[(role, version)]: ``version``, the active one now, and the base model it was made from."""
    roles = [(Role.CANDIDATE, version)]
    active = ModelVersion.objects.filter(is_active=True).first()
    if active is not None:
        roles.append((Role.ACTIVE, active))
    base = base_version_get(base_model=version.base_model)
    if base is not None:
        roles.append((Role.BASE, base))
    return roles


def _distinct(roles):
    """The versions to score, each once (the active version may be the base)."""
    return list({version.pk: version for _, version in roles}.values())


def evaluation_execute(*, evaluation_id, message_time_limit=None):
    """Run a queued evaluation in this process, then the promotion gate. Returns the
    evaluation, or None if it was not ours to run. ``message_time_limit``: see work_claim."""
    if not work_claim(Evaluation, evaluation_id, message_time_limit=message_time_limit):
        logger.info(
            "Evaluation %s is not queued (cancelled, gone, resized, or taken by another worker); skipping",
            evaluation_id,
        )
        return None
    evaluation = Evaluation.objects.select_related("version").get(pk=evaluation_id)
    with Heartbeat(Evaluation, evaluation_id):
        try:
            _score_all(evaluation)
        except EvaluationCancelled as exc:
            logger.info("Evaluation %s %s", evaluation_id, exc)
            Evaluation.objects.filter(pk=evaluation_id, status=Status.RUNNING).update(
                status=Status.CANCELLED, error=str(exc), finished_at=timezone.now()
            )
            return Evaluation.objects.get(pk=evaluation_id)
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
    roles = _versions_to_score(evaluation.version)
    examples = [{"attributes": s["attributes"], "description": s["reference"]} for s in evaluation.samples]
    decoding = Decoding.from_dict(evaluation.decoding)
    distinct = _distinct(roles)
    count = len(examples)
    # A step is an example scored by a version: its output generated. The loss pass that comes
    # first (see work_units) is quick beside generating, and counted in the time of the steps.
    meter = ProgressMeter(
        Evaluation,
        evaluation.pk,
        total=count * len(distinct),
        prior_seconds_per_step=seconds_per_step_prior(evaluation),
        # Measured over the whole run: each version it scores loads, computes losses, then generates.
        window=None,
    )
    meter.start(count_from_now=True)
    cancel_requested = CancelCheck(Evaluation, evaluation.pk)
    scores = {}

    def progress(done, *, number):
        step = number * count + max(done - (work_units(examples) - count), 0)
        if cancel_requested():
            raise EvaluationCancelled(f"cancelled after {step} of {meter.total} examples scored")
        meter(step)

    for number, version in enumerate(distinct):
        scores[version.pk] = version_score(
            version,
            examples,
            decoding,
            fact_terms=evaluation.fact_terms,
            on_progress=functools.partial(progress, number=number),
        )
    with transaction.atomic():
        current = Evaluation.objects.select_for_update().get(pk=evaluation.pk)
        if current.status != Status.RUNNING:
            return  # failed by the stale check meanwhile: its results are not trusted
        if current.cancel_requested_at:
            raise EvaluationCancelled("cancelled while saving its scores")
        Evaluation.objects.filter(pk=evaluation.pk).update(
            status=Status.SUCCEEDED, step=meter.total, progress=1.0, eta_seconds=0, finished_at=timezone.now()
        )
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
