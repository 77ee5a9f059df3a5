"""A fine-tuning job through a real Celery worker process and the configured
broker (Redis in CI)."""

import pytest

from finetuning.models import FineTuningJob, ModelVersion
from finetuning.services.jobs import job_start
from tests.worker import celery_worker, wait_for


@pytest.mark.django_db(transaction=True)
def test_a_job_runs_in_a_real_worker_and_registers_a_version(base_version, dataset_factory, tmp_path):
    dataset = dataset_factory()
    with celery_worker(tmp_path / "worker.log") as worker:
        job = job_start(dataset=dataset, hyperparameters={"max_steps": 3, "batch_size": 4, "max_seq_length": 128})

        def finished():
            job.refresh_from_db()
            return job.status in FineTuningJob.FINISHED or worker.poll() is not None

        done = wait_for(finished, timeout=240)
    log = (tmp_path / "worker.log").read_text()
    assert done, f"job still {job.status} after 240 s; worker log:\n{log[-3000:]}"
    assert job.status == "succeeded", f"{job.error}\n{log[-3000:]}"
    version = ModelVersion.objects.get(job=job)
    assert version.kind == "lora" and job.total_steps == 3
    assert ModelVersion.objects.get(is_active=True) == base_version
