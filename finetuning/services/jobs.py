"""Fine-tuning jobs: start, claim, run, finish."""

import functools
import hashlib
import logging
import platform
import shutil
import time
import uuid

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from finetuning import store
from finetuning.hyperparameters import hyperparameters_parse
from finetuning.models import FineTuningJob, ModelVersion, TrainingExample
from finetuning.prompts import PROMPT_FORMAT_VERSION, training_pair
from finetuning.selectors import trainable_examples
from finetuning.services.versions import version_register

logger = logging.getLogger(__name__)

VALIDATION_PERCENT = 10
# Below this many unassigned examples a validation split costs more than it tells.
MIN_EXAMPLES_FOR_SPLIT = 20
PROGRESS_EVERY_SECONDS = 2.0


class JobError(Exception):
    pass


def job_start(*, dataset, hyperparameters=None, requested_by=None):
    """Validate and queue a fine-tuning job; the worker picks it up after commit.
    Raises HyperparameterError or JobError before anything is queued."""
    hp = hyperparameters_parse(hyperparameters)
    if not dataset.examples.exists():
        raise JobError(f"dataset {dataset.name} has no examples to train on")
    base_model = settings.BASE_MODEL_NAME
    if not (store.absolute(store.base_relpath(base_model)) / store.MANIFEST).is_file():
        raise JobError(f"base model {base_model} is not prepared; run `python manage.py prepare_base_model`")
    with transaction.atomic():
        job = FineTuningJob.objects.create(
            dataset=dataset, base_model=base_model, hyperparameters=hp.as_dict(), requested_by=requested_by
        )
        # After commit, so that the worker never looks for a row that isn't there yet.
        transaction.on_commit(functools.partial(_enqueue, job.pk))
    return job


def _enqueue(job_id):
    from finetuning.tasks import job_run

    try:
        job_run.delay(job_id)
    except Exception as exc:  # the broker is down: say so rather than leave the job queued forever
        logger.exception("Could not queue job %s", job_id)
        FineTuningJob.objects.filter(pk=job_id, status=FineTuningJob.Status.QUEUED).update(
            status=FineTuningJob.Status.FAILED,
            error=f"could not reach the task broker to queue this job: {exc}",
            finished_at=timezone.now(),
        )


def split_examples(rows):
    """Honour explicit splits; send ~10% of unassigned examples to validation,
    chosen by content hash so the same example always lands on the same side."""
    train, validation = [], []
    unassigned = [row for row in rows if row["split"] == TrainingExample.Split.UNASSIGNED]
    split_unassigned = len(unassigned) >= MIN_EXAMPLES_FOR_SPLIT
    for row in rows:
        if row["split"] == TrainingExample.Split.VALIDATION:
            validation.append(row)
        elif row["split"] == TrainingExample.Split.TRAIN or not split_unassigned:
            train.append(row)
        elif int(row["content_hash"][:8], 16) % 100 < VALIDATION_PERCENT:
            validation.append(row)
        else:
            train.append(row)
    return train, validation


def _versions():
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


class _ProgressReporter:
    """Writes progress to the job row, at most every few seconds."""

    def __init__(self, job_id):
        self.job_id = job_id
        self.last = 0.0

    def __call__(self, step, total, loss):
        now = time.monotonic()
        if step < total and now - self.last < PROGRESS_EVERY_SECONDS:
            return
        self.last = now
        FineTuningJob.objects.filter(pk=self.job_id).update(
            step=step, total_steps=total, progress=step / total if total else 0.0, metrics={"train_loss": loss}
        )


def _train_version(job):
    from finetuning.training import train

    hp = hyperparameters_parse(job.hyperparameters)
    base_relpath = store.base_relpath(job.base_model)
    base_dir = store.absolute(base_relpath)
    base_sha = store.manifest_read(base_dir)["sha256"]
    rows = list(trainable_examples(dataset=job.dataset))
    if not rows:
        raise JobError(f"dataset {job.dataset.name} has no examples to train on")
    train_rows, validation_rows = split_examples(rows)
    if not train_rows:
        raise JobError(f"dataset {job.dataset.name} has no training examples (all are in validation)")
    data_sha = hashlib.sha256("".join(row["content_hash"] for row in rows).encode()).hexdigest()

    name = f"{store.slug(job.dataset.name)}-job{job.pk}"
    # The directory name is unique on its own: a database can be reset while the store is kept.
    relpath = store.version_relpath(f"{name}-{uuid.uuid4().hex[:8]}")
    with store.artifact_writer(relpath) as output_dir:
        result = train(
            base_dir=base_dir,
            train_pairs=[training_pair(r["attributes"], r["description"]) for r in train_rows],
            validation_pairs=[training_pair(r["attributes"], r["description"]) for r in validation_rows],
            hp=hp,
            output_dir=output_dir,
            on_step=_ProgressReporter(job.pk),
        )
        metrics = result.metrics()
        store.recipe_write(
            output_dir,
            {
                "kind": hp.method,
                "name": name,
                "base_model": job.base_model,
                "base_artifact": base_relpath,
                "base_sha256": base_sha,
                "prompt_format_version": PROMPT_FORMAT_VERSION,
                "hyperparameters": hp.as_dict(),
                "data": {
                    "dataset": job.dataset.name,
                    "examples_sha256": data_sha,
                    "train_example_ids": [r["id"] for r in train_rows],
                    "validation_example_ids": [r["id"] for r in validation_rows],
                },
                "metrics": metrics,
                "environment": _versions(),
            },
        )
        sha = store.manifest_write(output_dir)
    try:
        return version_register(
            name=name,
            kind=ModelVersion.Kind.LORA if hp.method == "lora" else ModelVersion.Kind.FULL,
            base_model=job.base_model,
            relpath=relpath,
            sha256=sha,
            hyperparameters=hp.as_dict(),
            metrics=metrics,
            job=job,
        )
    except BaseException:
        # Never leave an artifact in the store that no version owns.
        shutil.rmtree(store.absolute(relpath), ignore_errors=True)
        raise


def job_execute(*, job_id):
    """Run a queued job in this process. Claiming is a conditional update, so
    two workers handed the same job can never both run it."""
    claimed = FineTuningJob.objects.filter(pk=job_id, status=FineTuningJob.Status.QUEUED).update(
        status=FineTuningJob.Status.RUNNING, started_at=timezone.now()
    )
    if not claimed:
        logger.info("Job %s is not queued (gone, or taken by another worker); skipping", job_id)
        return None
    job = FineTuningJob.objects.select_related("dataset").get(pk=job_id)
    if settings.TRAINING_TORCH_THREADS:
        import torch

        torch.set_num_threads(settings.TRAINING_TORCH_THREADS)
    try:
        version = _train_version(job)
    except Exception as exc:
        logger.exception("Job %s failed", job_id)
        FineTuningJob.objects.filter(pk=job_id).update(
            status=FineTuningJob.Status.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        return None
    FineTuningJob.objects.filter(pk=job_id).update(
        status=FineTuningJob.Status.SUCCEEDED,
        progress=1.0,
        metrics=version.metrics,
        finished_at=timezone.now(),
    )
    return version
