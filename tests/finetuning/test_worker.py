"""Fine-tuning jobs and evaluations through real Celery worker processes and the
configured broker (Redis in CI): run, cancel, a worker killed mid-job, and an
automatic evaluation that does not hold a training job back."""

import signal
import time

import pytest

from finetuning import store
from finetuning.models import Evaluation, FineTuningJob, ModelVersion
from finetuning.services.evaluations import evaluation_cancel
from finetuning.services.jobs import job_cancel, job_execute, job_start
from tests.worker import celery_worker, wait_for

# Enough tiny-model steps to still be running when the test acts.
LONG = {"epochs": 50, "batch_size": 4, "max_seq_length": 128}
FAST = {"max_steps": 3, "batch_size": 4, "max_seq_length": 128}


def _log(path):
    return path.read_text()[-3000:] if path.exists() else ""


def _refreshed(job):
    job.refresh_from_db()
    return job


@pytest.mark.django_db(transaction=True)
def test_a_job_runs_in_a_real_worker_and_registers_a_version(base_version, dataset_factory, tmp_path):
    dataset = dataset_factory()
    log = tmp_path / "worker.log"
    with celery_worker(log) as worker:
        job = job_start(dataset=dataset, hyperparameters={"max_steps": 3, "batch_size": 4, "max_seq_length": 128})
        done = wait_for(lambda: _refreshed(job).status in FineTuningJob.FINISHED or worker.poll() is not None, 240)
    assert done, f"job still {job.status} after 240 s; worker log:\n{_log(log)}"
    assert job.status == "succeeded", f"{job.error}\n{_log(log)}"
    version = ModelVersion.objects.get(job=job)
    assert version.kind == "lora" and job.total_steps == 3 and len(job.loss_history) == 3
    assert job.environment["device"] == "cpu" and job.worker
    assert ModelVersion.objects.get(is_active=True) == base_version


@pytest.mark.django_db(transaction=True)
def test_a_running_job_cancelled_stops_in_the_worker_and_leaves_nothing(
    base_version, dataset_factory, model_store, tmp_path
):
    log = tmp_path / "worker.log"
    with celery_worker(log):
        job = job_start(dataset=dataset_factory(examples=200), hyperparameters=LONG)
        assert wait_for(lambda: _refreshed(job).step >= 2, 240), f"never started: {job.status}\n{_log(log)}"
        job_cancel(job=job)
        assert wait_for(lambda: _refreshed(job).status in FineTuningJob.FINISHED, 60), _log(log)
    assert job.status == "cancelled", f"{job.error}\n{_log(log)}"
    assert job.error.startswith("cancelled at step")
    assert not ModelVersion.objects.filter(job=job).exists()
    assert ModelVersion.objects.get(is_active=True) == base_version
    versions = store.absolute(store.VERSIONS)
    assert not versions.exists() or not any(versions.iterdir())


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_job_leaves_it_failed_after_the_stale_check(
    base_version, dataset_factory, model_store, tmp_path
):
    beat = {"JOB_HEARTBEAT_SECONDS": "0.5", "JOB_STALE_AFTER_SECONDS": "3"}
    with celery_worker(tmp_path / "first.log", **beat) as worker:
        job = job_start(dataset=dataset_factory(examples=200), hyperparameters=LONG)
        assert wait_for(lambda: _refreshed(job).step >= 2, 240), _log(tmp_path / "first.log")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert _refreshed(job).status == "running"  # nobody is left to say otherwise
    time.sleep(4)  # the heartbeat goes stale
    # A worker that starts (the usual sequel to a crash) runs the stale check.
    with celery_worker(tmp_path / "second.log", **beat):
        failed = wait_for(lambda: _refreshed(job).status == "failed", 120)
    assert failed, f"still {job.status}\n{_log(tmp_path / 'second.log')}"
    assert job.error.startswith("worker lost") and job.finished_at
    assert not ModelVersion.objects.filter(job=job).exists()
    assert ModelVersion.objects.get(is_active=True) == base_version
    versions = store.absolute(store.VERSIONS)
    assert not versions.exists() or not any(versions.iterdir())  # its half-written adapter is gone too


@pytest.mark.django_db(transaction=True)
def test_a_queued_job_the_broker_lost_runs_when_a_worker_starts(base_version, dataset_factory, tmp_path):
    from genapi.celery import app

    job = job_start(dataset=dataset_factory(), hyperparameters={"max_steps": 2, "batch_size": 4, "max_seq_length": 128})
    with app.connection_for_write() as connection:  # Redis restarted without its data
        assert connection.default_channel.queue_purge("training") >= 1
    log = tmp_path / "worker.log"
    with celery_worker(log) as worker:
        done = wait_for(lambda: _refreshed(job).status in FineTuningJob.FINISHED or worker.poll() is not None, 240)
    assert done, f"job still {job.status} after 240 s; worker log:\n{_log(log)}"
    assert job.status == "succeeded", f"{job.error}\n{_log(log)}"
    assert job.requeue_count == 1


@pytest.mark.django_db(transaction=True)
def test_an_automatic_evaluation_queued_first_does_not_delay_a_training_job(
    base_version, dataset_factory, model_store, settings, tmp_path
):
    # A long automatic evaluation: 40 examples, each generated to 256 tokens by two versions.
    settings.EVALUATION_MAX_EXAMPLES = 40
    settings.EVALUATION_MAX_NEW_TOKENS = 256
    dataset = dataset_factory(name="evaluated", examples=60)
    held = list(dataset.examples.order_by("id").values_list("id", flat=True)[:40])
    dataset.examples.filter(id__in=held).update(split="validation")
    version = job_execute(job_id=job_start(dataset=dataset, hyperparameters=FAST).pk)
    evaluation = Evaluation.objects.get(version=version)  # queued as the version committed
    assert evaluation.automatic and evaluation.status == "queued"

    evaluation_log, training_log = tmp_path / "evaluation.log", tmp_path / "training.log"
    with celery_worker(evaluation_log, queues="evaluation"), celery_worker(training_log, queues="training"):
        started = wait_for(lambda: _refreshed(evaluation).status != "queued", 240)
        assert started and evaluation.status == "running", f"{evaluation.error}\n{_log(evaluation_log)}"
        job = job_start(dataset=dataset_factory(name="next"), hyperparameters=FAST)
        done = wait_for(lambda: _refreshed(job).status in FineTuningJob.FINISHED, 240)
        assert done and job.status == "succeeded", f"job {job.status} {job.error}\n{_log(training_log)}"
        # The job trained and finished while the evaluation queued before it was still scoring.
        evaluation.refresh_from_db()
        assert evaluation.status == "running" and evaluation.step < evaluation.total_steps

        # Cancelled while running: it stops at the next example and keeps nothing; the job's
        # own evaluation, queued meanwhile, is cancelled before it starts.
        evaluation_cancel(evaluation=evaluation)
        # The job's own evaluation is queued just after the job's success commits.
        assert wait_for(lambda: Evaluation.objects.filter(version__job=job).exists(), 30)
        evaluation_cancel(evaluation=Evaluation.objects.get(version__job=job))
        stopped = wait_for(lambda: _refreshed(evaluation).status in Evaluation.FINISHED, 60)
    assert stopped and evaluation.status == "cancelled", f"{evaluation.error}\n{_log(evaluation_log)}"
    assert evaluation.error.startswith("cancelled after") and not evaluation.scores.exists()
    assert evaluation.finished_at > job.finished_at
