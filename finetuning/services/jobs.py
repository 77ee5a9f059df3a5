"""Fine-tuning jobs: start, claim, run, cancel, finish, and reap the ones
whose worker died.

States: queued -> running -> succeeded | failed | cancelled. Every transition
is a conditional update on the current state, so two workers, two clicks or a
worker and the stale check can never both move one job, and a task delivered
twice runs once: the queued check may send it again.
"""

import functools
import logging
import math
import shutil
import uuid

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from finetuning import store
from finetuning.facts import features_with_facts, mention_spans, unsupported
from finetuning.hyperparameters import hyperparameters_parse
from finetuning.models import FineTuningJob, ModelVersion
from finetuning.prompts import PROMPT_FORMAT_VERSION, training_description, training_pair
from finetuning.recipe import Recipe
from finetuning.selectors import SnapshotError, fact_vocabulary, snapshot_read, snapshot_verify
from finetuning.services.evaluations import evaluation_after_job
from finetuning.services.snapshots import snapshot_freeze
from finetuning.services.versions import version_register
from finetuning.services.workers import (
    BrokerUnavailable,
    CancelCheck,
    Heartbeat,
    ProgressMeter,
    queued_recheck,
    seconds_per_step_prior,
    stale_fail,
    work_cancel,
    work_claim,
    work_publish,
    work_time_limit,
)
from finetuning.training import TrainingCancelled, planned_steps

logger = logging.getLogger(__name__)

Status = FineTuningJob.Status
# The loss chart needs a shape, not every step: long runs are averaged down to this many points.
MAX_HISTORY_POINTS = 500


class JobError(Exception):
    pass


class JobConflict(JobError):
    """The dataset already has a queued or running job."""


class JobNotQueued(JobError, BrokerUnavailable):
    """The broker could not be reached to queue the job: it is failed, the dataset free."""


def _base_prepared(base_model):
    # Asks the bucket when there is one: a web process need not hold the weights to queue a job.
    try:
        return store.exists(store.base_relpath(base_model))
    except store.ArtifactError as exc:
        raise JobError(f"base model {base_model} cannot be looked up: {exc}") from exc


def job_time_limit(*, snapshot, hp):
    """Seconds a job may run before Celery stops it, from the tokens it will process
    (training steps and validation passes): see work_time_limit."""
    steps = planned_steps(snapshot.train_examples, hp)
    tokens = steps * hp.batch_size * hp.gradient_accumulation_steps * hp.max_seq_length
    evaluations = hp.epochs if not hp.eval_steps else math.ceil(steps / hp.eval_steps) + 1
    tokens += evaluations * snapshot.validation_examples * hp.max_seq_length
    return work_time_limit(tokens=tokens)


def job_start(*, dataset, hyperparameters=None, requested_by=None, snapshot=None):
    """Validate, freeze the data and queue a fine-tuning job; a worker picks it
    up after commit. Raises HyperparameterError or JobError before anything is
    queued, and JobNotQueued when the broker cannot be reached (the job is then
    failed). ``snapshot`` retrains on an earlier snapshot of the same dataset."""
    hp = hyperparameters_parse(hyperparameters)
    base_model = settings.BASE_MODEL_NAME
    if not _base_prepared(base_model):
        raise JobError(f"base model {base_model} is not prepared; run `python manage.py prepare_base_model`")
    active = _active_job(dataset)
    if active:
        raise _busy(dataset, active)
    try:
        if snapshot is None:
            snapshot = snapshot_freeze(dataset=dataset)
        elif snapshot.dataset_id != dataset.pk:
            raise JobError(f"snapshot {snapshot.sha256[:12]} belongs to dataset {snapshot.dataset}, not {dataset}")
        else:
            snapshot_verify(snapshot)
    except SnapshotError as exc:
        raise JobError(str(exc)) from exc
    try:
        with transaction.atomic():
            job = FineTuningJob.objects.create(
                dataset=dataset,
                snapshot=snapshot,
                base_model=base_model,
                hyperparameters=hp.as_dict(),
                # Planned (training may skip examples): the queue's estimates need a size before it runs.
                total_steps=planned_steps(snapshot.train_examples, hp),
                time_limit_seconds=job_time_limit(snapshot=snapshot, hp=hp),
                requested_by=requested_by,
            )
    except IntegrityError as exc:  # another start on this dataset won the race
        active = _active_job(dataset)
        if active is None:
            raise
        raise _busy(dataset, active) from exc
    # After commit, so that the worker never looks for a row that isn't there yet: at once when
    # the caller holds no transaction (a request, a command), so that a broker out of reach
    # fails this call (503) instead of leaving a job queued that no worker will ever see.
    transaction.on_commit(functools.partial(_job_publish, job.pk, job.time_limit_seconds))
    return job


def _active_job(dataset):
    return FineTuningJob.objects.filter(dataset=dataset, status__in=FineTuningJob.ACTIVE).first()


def _busy(dataset, active):
    return JobConflict(
        f"dataset {dataset.name} already has a {active.status} fine-tuning job (job {active.pk}); "
        "wait for it to finish or cancel it"
    )


def job_retrain(*, version, requested_by=None):
    """A new job on exactly the data, hyperparameters and base model that made ``version``."""
    if version.snapshot is None or version.job is None:
        raise JobError(f"version {version.name} was not trained by a job here, so it has no recipe to repeat")
    if version.base_model != settings.BASE_MODEL_NAME:
        raise JobError(f"version {version.name} was trained on {version.base_model}, not {settings.BASE_MODEL_NAME}")
    return job_start(
        dataset=version.job.dataset,
        # A recipe from before name_product, facts_from_description or invented_facts existed
        # trained on the descriptions and attributes as written.
        hyperparameters={
            "name_product": False,
            "facts_from_description": False,
            "invented_facts": "learn",
            **version.hyperparameters,
        },
        requested_by=requested_by,
        snapshot=version.snapshot,
    )


def _job_publish(job_id, time_limit):
    from finetuning.tasks import job_run

    try:
        work_publish(
            FineTuningJob,
            job_run,
            pk=job_id,
            time_limit=time_limit,
            again="Start the job again once the broker is back.",
        )
    except BrokerUnavailable as exc:
        raise JobNotQueued(
            f"the task broker is not reachable, so job {job_id} could not be queued; it is marked failed and "
            "the dataset is free: try again in a minute"
        ) from exc


def job_cancel(*, job):
    """Cancel a queued job at once, or ask a running one to stop at its next
    step. Raises JobError if the job has already finished."""
    cancelled = work_cancel(FineTuningJob, job.pk, before_start="cancelled before it started")
    job.refresh_from_db()
    if not cancelled and job.status in FineTuningJob.FINISHED:
        raise JobError(f"job {job.pk} has already {job.status}")
    return job


def jobs_reap_stale():
    """Mark failed every running job whose worker stopped beating, and remove its
    half-written files. Returns the ids of the jobs it failed."""
    reaped = stale_fail(FineTuningJob, again="Start the job again.")
    for job in reaped:
        _partial_artifacts_remove(job)
    return [job.pk for job in reaped]


def jobs_recheck_queued(*, worker_start=False):
    """Send again the task of every job still queued long after it was sent (the broker may
    have lost it), and fail the ones no worker took for JOB_QUEUED_TIMEOUT_SECONDS; at worker
    start, send every queued one again. Returns (ids sent again, ids failed)."""
    from finetuning.tasks import job_run

    resent, failed = queued_recheck(FineTuningJob, job_run, again="Start the job again.", worker_start=worker_start)
    return resent, [job.pk for job in failed]


def _version_name(job):
    return f"{store.slug(job.dataset.name)}-job{job.pk}"


def _partial_artifacts_remove(job):
    for partial in store.absolute(store.VERSIONS).glob(f".partial-{_version_name(job)}-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _downsample(history, limit=MAX_HISTORY_POINTS):
    if len(history) <= limit:
        return history
    size = math.ceil(len(history) / limit)
    return [
        [chunk[-1][0], round(sum(loss for _, loss in chunk) / len(chunk), 5)]
        for chunk in (history[i : i + size] for i in range(0, len(history), size))
    ]


class _Progress:
    """Reports steps, time left and losses to the job row (throttled, see ProgressMeter),
    and raises TrainingCancelled at the first step after a cancel request."""

    def __init__(self, job):
        self.job_id = job.pk
        self.history = []
        self.validation = []
        self.cancel_requested = CancelCheck(FineTuningJob, job.pk)
        # Measured from the first step on: loading the model is not a training step.
        self.meter = ProgressMeter(
            FineTuningJob, job.pk, total=job.total_steps, prior_seconds_per_step=seconds_per_step_prior(job)
        )
        self.meter.start(count_from_now=False)

    def _losses(self):
        return {"loss_history": _downsample(self.history)}

    def on_step(self, step, total, loss):
        self.history.append([step, round(loss, 5)])
        if self.cancel_requested():
            self.meter(step, total=total, force=True, extra=self._losses)  # the job shows where it stopped
            raise TrainingCancelled(f"cancelled at step {step} of {total}")
        self.meter(step, total=total, extra=self._losses)

    def on_evaluate(self, step, loss):
        self.validation.append([step, round(loss, 5)])
        FineTuningJob.objects.filter(pk=self.job_id).update(validation_history=self.validation)


def training_pairs(*, train_rows, validation_rows, hp):
    """(train pairs, validation pairs) of (prompt, completion) a job trains and validates on,
    from its snapshot's rows; the fine-tune pre-flight counts the same pairs."""
    terms = fact_vocabulary() if hp.facts_from_description else None

    def attributes(row):
        if terms is None:
            return row["attributes"]
        features = features_with_facts(row["attributes"], row["description"], terms)
        if features == list(row["attributes"].get("features") or []):
            return row["attributes"]  # no fact to add: the prompt as a client would write it
        return {**row["attributes"], "features": features}

    def pair(row):
        prompt_attributes = attributes(row)
        description = training_description(row["attributes"], row["description"], name_product=hp.name_product)
        prompt, completion = training_pair(prompt_attributes, description)
        if hp.invented_facts == "learn":
            return prompt, completion
        invented = unsupported(description, prompt_attributes, vocabulary)
        return prompt, completion, mention_spans(description, invented)

    vocabulary = fact_vocabulary() if hp.invented_facts != "learn" else None
    train = [pair(r) for r in train_rows]
    return train, [training_pair(r["attributes"], r["description"]) for r in validation_rows]


def _train_version(job, progress):
    from finetuning.training import train

    hp = hyperparameters_parse(job.hyperparameters)
    base_relpath = store.base_relpath(job.base_model)
    if not _base_prepared(job.base_model):
        raise JobError(f"base model {job.base_model} is not prepared; run `python manage.py prepare_base_model`")
    base_dir = store.local(base_relpath)
    base_sha = store.manifest_read(base_dir)["sha256"]
    if job.snapshot is None:
        raise JobError("this job has no data snapshot")
    train_rows, validation_rows = snapshot_read(job.snapshot)
    train_pairs, validation_pairs = training_pairs(train_rows=train_rows, validation_rows=validation_rows, hp=hp)

    name = _version_name(job)
    # The directory name is unique on its own: a database can be reset while the store is kept.
    relpath = store.version_relpath(f"{name}-{uuid.uuid4().hex[:8]}")
    with store.artifact_writer(relpath) as output_dir:
        result = train(
            base_dir=base_dir,
            train_pairs=train_pairs,
            validation_pairs=validation_pairs,
            hp=hp,
            output_dir=output_dir,
            on_step=progress.on_step,
            on_evaluate=progress.on_evaluate,
        )
        metrics = result.metrics()
        metrics["loss_history"] = _downsample(metrics["loss_history"])
        store.recipe_write(
            output_dir,
            Recipe(
                kind=hp.method,
                name=name,
                base_model=job.base_model,
                base_artifact=base_relpath,
                base_sha256=base_sha,
                prompt_format_version=PROMPT_FORMAT_VERSION,
                hyperparameters=hp.as_dict(),
                data={
                    "dataset": job.dataset.name,
                    "snapshot": job.snapshot.path,
                    "snapshot_sha256": job.snapshot.sha256,
                    "train_example_ids": [r["id"] for r in train_rows],
                    "validation_example_ids": [r["id"] for r in validation_rows],
                },
                metrics=metrics,
                environment=job.environment,
            ),
        )
        sha = store.manifest_write(output_dir)
    try:
        with transaction.atomic():
            # Registered only if the job is still ours to finish: a cancel that
            # came in during saving wins, and so does the stale check.
            current = FineTuningJob.objects.select_for_update().get(pk=job.pk)
            if current.cancel_requested_at:
                raise TrainingCancelled("cancelled while saving")
            if current.status != Status.RUNNING:
                raise JobError(f"job became {current.status} while it ran: {current.error}")
            version = version_register(
                name=name,
                kind=ModelVersion.Kind.LORA if hp.method == "lora" else ModelVersion.Kind.FULL,
                base_model=job.base_model,
                relpath=relpath,
                sha256=sha,
                hyperparameters=hp.as_dict(),
                metrics=metrics,
                job=job,
                snapshot=job.snapshot,
            )
            FineTuningJob.objects.filter(pk=job.pk).update(
                status=Status.SUCCEEDED,
                progress=1.0,
                step=result.steps,
                total_steps=result.steps,
                eta_seconds=0,
                loss_history=metrics["loss_history"],
                validation_history=metrics["validation_history"],
                metrics={k: v for k, v in metrics.items() if k not in ("loss_history", "validation_history")},
                finished_at=timezone.now(),
            )
            # After commit: a worker scores the new version next to the active one and the base.
            transaction.on_commit(functools.partial(evaluation_after_job, version_id=version.pk))
            return version
    except BaseException:
        # Never leave an artifact in the store (nor in its bucket) that no version owns.
        store.remove(relpath)
        raise


def _describe(exc, job):
    """A failure as a curator can act on it."""
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        return f"stopped by its time limit of {job.time_limit_seconds} s"
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        hp = job.hyperparameters
        return (
            f"out of memory on {job.environment.get('device', 'this device')} at batch_size={hp.get('batch_size')}, "
            f"max_seq_length={hp.get('max_seq_length')}: lower batch_size (raise gradient_accumulation_steps to keep "
            "the effective batch) or max_seq_length"
        )
    if isinstance(exc, (JobError, SnapshotError, store.ArtifactError)):
        return text
    return f"{type(exc).__name__}: {text}"


def job_execute(*, job_id, message_time_limit=None):
    """Run a queued job in this process; return its ModelVersion, or None if
    the job was not ours to run or did not succeed. ``message_time_limit``: see work_claim."""
    from finetuning.training import runtime_environment

    if not work_claim(FineTuningJob, job_id, message_time_limit=message_time_limit):
        logger.info("Job %s is not queued (cancelled, gone, or taken by another worker); skipping", job_id)
        return None
    if settings.TRAINING_TORCH_THREADS:
        import torch

        torch.set_num_threads(settings.TRAINING_TORCH_THREADS)
    FineTuningJob.objects.filter(pk=job_id).update(environment=runtime_environment())
    job = FineTuningJob.objects.select_related("dataset", "snapshot").get(pk=job_id)
    with Heartbeat(FineTuningJob, job_id):
        try:
            return _train_version(job, _Progress(job))
        except TrainingCancelled as exc:
            logger.info("Job %s %s", job_id, exc)
            FineTuningJob.objects.filter(pk=job_id, status=Status.RUNNING).update(
                status=Status.CANCELLED, error=str(exc), finished_at=timezone.now()
            )
        except Exception as exc:
            logger.exception("Job %s failed", job_id)
            FineTuningJob.objects.filter(pk=job_id, status=Status.RUNNING).update(
                status=Status.FAILED, error=_describe(exc, job), finished_at=timezone.now()
            )
    return None
