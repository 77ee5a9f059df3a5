"""Fine-tuning jobs through real Celery worker processes and the configured
broker (Redis in CI): run, cancel, and a worker killed mid-job."""

import signal
import time

import pytest

from finetuning import store
from finetuning.models import FineTuningJob, ModelVersion
from finetuning.services.jobs import job_cancel, job_start
from tests.worker import celery_worker, wait_for

# Enough tiny-model steps to still be running when the test acts.
LONG = {"epochs": 50, "batch_size": 4, "max_seq_length": 128}


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
