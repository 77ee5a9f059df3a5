import hashlib

import pytest

from finetuning import store
from finetuning.hyperparameters import HyperparameterError, hyperparameters_parse
from finetuning.models import FineTuningJob, ModelVersion
from finetuning.services.jobs import JobError, job_execute, job_start, split_examples

FAST = {"max_steps": 2, "batch_size": 4, "max_seq_length": 128}


def test_hyperparameters_have_defaults_and_name_each_bad_field():
    assert hyperparameters_parse({}).method == "lora"
    with pytest.raises(HyperparameterError) as info:
        hyperparameters_parse({"epochs": 0, "learning_rate": "fast", "method": "magic", "colour": 1, "batch_size": 2.5})
    assert set(info.value.errors) == {"epochs", "learning_rate", "method", "colour", "batch_size"}


def test_bad_hyperparameters_are_refused_before_anything_is_queued(base_version, dataset_factory):
    dataset = dataset_factory()
    with pytest.raises(HyperparameterError):
        job_start(dataset=dataset, hyperparameters={"learning_rate": 5})
    assert not FineTuningJob.objects.exists()


def test_an_empty_dataset_is_refused(base_version, dataset_factory):
    with pytest.raises(JobError, match="no examples"):
        job_start(dataset=dataset_factory(examples=0))


def test_job_start_queues_after_commit(base_version, dataset_factory, django_capture_on_commit_callbacks):
    dataset = dataset_factory()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = job_start(dataset=dataset, hyperparameters=FAST)
    assert job.status == "queued" and len(callbacks) == 1


def test_split_honours_explicit_splits_and_is_deterministic():
    rows = [{"split": "unassigned", "content_hash": hashlib.sha256(str(i).encode()).hexdigest()} for i in range(200)]
    rows += [{"split": "validation", "content_hash": "f" * 64}, {"split": "train", "content_hash": "0" * 64}]
    train, validation = split_examples(rows)
    assert rows[-2] in validation and rows[-1] in train
    assert 10 <= len(validation) <= 40
    assert split_examples(rows) == (train, validation)
    small_train, small_validation = split_examples(rows[:5])
    assert small_validation == [] and len(small_train) == 5


def test_a_job_trains_saves_safetensors_and_registers_a_version(base_version, dataset_factory, model_store):
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    version = job_execute(job_id=job.pk)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert (job.step, job.total_steps, job.progress) == (2, 2, 1.0)
    assert version.kind == "lora" and version.job == job and not version.is_active
    directory = store.absolute(version.artifact_path)
    files = {p.name for p in directory.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "genapi.json", "manifest.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert store.manifest_verify(directory) == version.sha256
    recipe = store.recipe_read(directory)
    assert recipe["base_model"] == "tiny-llama" and recipe["prompt_format_version"] == version.prompt_format_version
    assert len(recipe["data"]["train_example_ids"]) + len(recipe["data"]["validation_example_ids"]) == 24
    assert version.metrics["validation_loss"] > 0 and len(version.metrics["loss_history"]) == 2


def test_a_full_fine_tune_saves_a_whole_checkpoint(base_version, dataset_factory):
    job = job_start(dataset=dataset_factory(), hyperparameters={**FAST, "method": "full", "learning_rate": 1e-4})
    version = job_execute(job_id=job.pk)
    assert version.kind == "full"
    assert (store.absolute(version.artifact_path) / "model.safetensors").is_file()


def test_a_job_runs_once_however_often_it_is_delivered(base_version, dataset_factory):
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    assert job_execute(job_id=job.pk) is not None
    assert job_execute(job_id=job.pk) is None
    assert ModelVersion.objects.filter(job=job).count() == 1


def test_a_failing_job_is_marked_failed_and_touches_nothing(base_version, dataset_factory, model_store):
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    # The base weights vanish between queueing and running.
    for path in (model_store / "base" / "tiny-llama").glob("*.safetensors"):
        path.unlink()
    assert job_execute(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == "failed" and job.error and job.finished_at
    assert ModelVersion.objects.get(is_active=True) == base_version
    assert ModelVersion.objects.count() == 1
    assert not (model_store / "versions").exists() or not any((model_store / "versions").iterdir())


def test_a_job_that_cannot_reach_the_broker_fails_instead_of_waiting_forever(
    base_version, dataset_factory, monkeypatch, django_capture_on_commit_callbacks
):
    from kombu.exceptions import OperationalError

    from finetuning import tasks

    def broker_down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to redis:6379. Connection refused.")

    monkeypatch.setattr(tasks.job_run, "delay", broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    job.refresh_from_db()
    assert job.status == "failed" and "broker" in job.error
