import hashlib

import pytest

from finetuning import store
from finetuning.hyperparameters import HyperparameterError, hyperparameters_parse
from finetuning.models import FineTuningJob, ModelVersion
from finetuning.prompts import training_description
from finetuning.services.examples import example_create
from finetuning.services.jobs import JobError, job_execute, job_start
from finetuning.services.snapshots import split_examples

FAST = {"max_steps": 2, "batch_size": 4, "max_seq_length": 128}


def test_hyperparameters_have_defaults_and_name_each_bad_field():
    assert hyperparameters_parse({}).method == "lora"
    with pytest.raises(HyperparameterError) as info:
        hyperparameters_parse({"epochs": 0, "learning_rate": "fast", "method": "magic", "colour": 1, "batch_size": 2.5})
    assert set(info.value.errors) == {"epochs", "learning_rate", "method", "colour", "batch_size"}


def test_name_product_is_on_by_default_and_takes_a_yes_or_no():
    assert hyperparameters_parse({}).name_product is True
    assert hyperparameters_parse({"name_product": "off"}).name_product is False
    assert hyperparameters_parse({"name_product": False}).name_product is False
    with pytest.raises(HyperparameterError) as info:
        hyperparameters_parse({"name_product": "maybe"})
    assert info.value.errors == {"name_product": "must be true or false"}


def test_training_descriptions_name_the_product_unless_switched_off():
    on = {"name_product": hyperparameters_parse({}).name_product}
    off = {"name_product": hyperparameters_parse({"name_product": False}).name_product}
    shorts = {"name": "Adicross Hybrid Shorts", "brand": "adidas"}
    unnamed = "Stay focused as the temperature heats up."
    assert training_description(shorts, unnamed, **on) == f"Adicross Hybrid Shorts. {unnamed}"
    assert training_description(shorts, unnamed, **off) == unnamed
    # A text that names the product already, in any case and number, is kept as written.
    named = "These adicross hybrid short are light."
    assert training_description(shorts, named, **on) == named
    assert training_description({"brand": "adidas"}, unnamed, **on) == unnamed


def test_a_job_trains_on_named_descriptions_and_validates_on_the_written_ones(
    base_version, dataset_factory, monkeypatch
):
    from finetuning import training

    dataset = dataset_factory(examples=0)
    for i in range(12):
        example_create(
            dataset=dataset,
            attributes={"name": f"Widget {i}", "color": "Red"},
            description=f"A handy tool, number {i} of a set.",
            split="validation" if i < 2 else "train",
        )
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    real = training.train
    monkeypatch.setattr(training, "train", spy)
    assert job_execute(job_id=job_start(dataset=dataset, hyperparameters=FAST).pk) is not None
    completions = [pair[1] for pair in seen["train_pairs"]]  # (prompt, completion, invented facts' spans)
    assert len(completions) == 10 and all(c.startswith("Widget ") for c in completions)
    assert all(completion.startswith("A handy tool") for _, completion in seen["validation_pairs"])


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
    rows = [
        {"split": "unassigned", "content_hash": hashlib.sha256(str(i).encode()).hexdigest(), "description": f"text {i}"}
        for i in range(200)
    ]
    rows += [
        {"split": "validation", "content_hash": "f" * 64, "description": "held"},
        {"split": "train", "content_hash": "0" * 64, "description": "trained"},
    ]
    train, validation = split_examples(rows)
    assert rows[-2] in validation and rows[-1] in train
    assert 10 <= len(validation) <= 40
    assert split_examples(rows) == (train, validation)
    small_train, small_validation = split_examples(rows[:5])
    assert small_validation == [] and len(small_train) == 5


def test_products_sharing_a_description_land_on_the_same_side():
    """Shop data reuses one description for several products: a split by row would
    train on the very text it then validates against."""
    rows = [
        {
            "split": "unassigned",
            "content_hash": hashlib.sha256(f"{i}-{c}".encode()).hexdigest(),
            "description": f"text {i}",
        }
        for i in range(100)
        for c in ("red", "blue", "green")
    ]
    train, validation = split_examples(rows)
    assert validation
    assert not {row["description"] for row in train} & {row["description"] for row in validation}


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
    assert recipe.base_model == "tiny-llama" and recipe.prompt_format_version == version.prompt_format_version
    assert recipe.kind == "lora" and recipe.base_sha256 == base_version.sha256
    assert len(recipe.data["train_example_ids"]) + len(recipe.data["validation_example_ids"]) == 24
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


def test_a_job_trains_on_its_frozen_snapshot_not_on_later_edits(base_version, dataset_factory, model_store):
    dataset = dataset_factory(examples=30)
    job = job_start(dataset=dataset, hyperparameters=FAST)
    snapshot = job.snapshot
    path = store.absolute(snapshot.path)
    assert path.is_file() and store.file_sha256(path) == snapshot.sha256
    assert (snapshot.examples, snapshot.train_examples + snapshot.validation_examples) == (30, 30)
    assert snapshot.validation_examples >= 1 and "unassigned" in snapshot.note
    # Edits after the start reach neither this job nor its version.
    dataset.examples.all().delete()
    version = job_execute(job_id=job.pk)
    assert version is not None and version.snapshot == snapshot
    recipe = store.recipe_read(store.absolute(version.artifact_path))
    assert recipe.data["snapshot_sha256"] == snapshot.sha256
    assert len(recipe.data["train_example_ids"]) == snapshot.train_examples


def test_a_dataset_too_small_to_split_trains_without_validation_and_says_so(base_version, dataset_factory):
    job = job_start(dataset=dataset_factory(examples=8), hyperparameters=FAST)
    assert job.snapshot.validation_examples == 0 and "no validation split" in job.snapshot.note
    version = job_execute(job_id=job.pk)
    assert version.metrics["validation_loss"] is None


def test_a_snapshot_changed_on_disk_is_refused(base_version, dataset_factory):
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    path = store.absolute(job.snapshot.path)
    path.write_text(path.read_text().replace("Product 1 ", "Product one "))
    assert job_execute(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == "failed" and "does not match its sha256" in job.error


def test_retraining_a_version_repeats_its_snapshot_and_hyperparameters(base_version, dataset_factory):
    from finetuning.services.jobs import job_retrain

    dataset = dataset_factory()
    first = job_execute(job_id=job_start(dataset=dataset, hyperparameters={**FAST, "seed": 3}).pk)
    dataset.examples.filter(name="Product 0").delete()  # the live data moves on
    again = job_retrain(version=first)
    assert again.snapshot == first.snapshot and again.hyperparameters == first.hyperparameters
    second = job_execute(job_id=again.pk)
    assert abs(second.metrics["final_train_loss"] - first.metrics["final_train_loss"]) < 1e-4
    # A version from before name_product existed trained on the descriptions as written.
    first.hyperparameters = {
        k: v
        for k, v in first.hyperparameters.items()
        if k not in ("name_product", "facts_from_description", "invented_facts")
    }
    first.save(update_fields=["hyperparameters"])
    retrained = job_retrain(version=first).hyperparameters
    assert retrained["name_product"] is False and retrained["facts_from_description"] is False
    assert retrained["invented_facts"] == "learn"


@pytest.mark.django_db
def test_fact_extraction_is_off_by_default_and_on_puts_the_descriptions_facts_in_the_training_prompts():
    from finetuning.services.jobs import training_pairs

    assert hyperparameters_parse({}).facts_from_description is False
    with pytest.raises(HyperparameterError) as info:
        hyperparameters_parse({"facts_from_description": "sometimes"})
    assert info.value.errors == {"facts_from_description": "must be true or false"}
    shoe = {"name": "Ultra Runner", "features": ["lace closure"]}
    rows = [
        {"attributes": shoe, "description": "Ultra Runner: a leather upper on a Boost midsole."},
        {"attributes": {"name": "Cap"}, "description": "Cap for sunny days."},  # no fact: as written
    ]
    on = hyperparameters_parse({"facts_from_description": True})
    (with_facts, plain), validation = training_pairs(train_rows=rows, validation_rows=rows, hp=on)
    assert "Features: lace closure; boost; leather" in with_facts[0]
    assert plain[0] == training_pairs(train_rows=rows, validation_rows=[], hp=hyperparameters_parse({}))[0][1][0]
    # Validation keeps the attributes a client would send.
    assert "leather" not in validation[0][0]
    off, _ = training_pairs(train_rows=rows, validation_rows=[], hp=hyperparameters_parse({}))
    assert "leather" not in off[0][0]


@pytest.mark.django_db
def test_invented_facts_are_avoided_by_default_and_marked_where_the_description_states_them():
    from finetuning.services.jobs import training_pairs

    assert hyperparameters_parse({}).invented_facts == "avoid"
    with pytest.raises(HyperparameterError) as info:
        hyperparameters_parse({"invented_facts": "forget"})
    assert info.value.errors == {"invented_facts": "must be one of learn, skip, avoid"}
    shoe = {"name": "Ultra Runner", "features": ["leather upper"]}
    rows = [{"attributes": shoe, "description": "A leather upper on a Boost midsole, for running."}]
    learn, _ = training_pairs(
        train_rows=rows, validation_rows=[], hp=hyperparameters_parse({"invented_facts": "learn"})
    )
    assert len(learn[0]) == 2  # prompt and completion, nothing marked
    for setting in ("skip", "avoid"):
        (pair,), validation = training_pairs(
            train_rows=rows, validation_rows=rows, hp=hyperparameters_parse({"invented_facts": setting})
        )
        prompt, completion, spans = pair
        assert (prompt, completion) == learn[0]
        # Leather is in the features: a fact the prompt gives is learnt as written.
        assert [completion[start:end] for start, end in spans] == ["Boost", "running"]
        assert len(validation[0]) == 2  # validation scores the copy as written
    # Facts moved into the prompt are not invented any more.
    both = hyperparameters_parse({"invented_facts": "avoid", "facts_from_description": True})
    (pair,), _ = training_pairs(train_rows=rows, validation_rows=[], hp=both)
    assert pair[2] == []


def test_progress_loss_history_eta_and_environment_are_recorded(base_version, dataset_factory, settings):
    settings.JOB_PROGRESS_SECONDS = 0
    job = job_start(dataset=dataset_factory(), hyperparameters={**FAST, "max_steps": 4, "eval_steps": 2})
    job_execute(job_id=job.pk)
    job.refresh_from_db()
    assert [step for step, _ in job.loss_history] == [1, 2, 3, 4]
    assert [step for step, _ in job.validation_history] == [2, 4]
    assert job.metrics["validation_loss"] == pytest.approx(job.validation_history[-1][1], abs=1e-5)
    assert job.environment["device"] == "cpu" and job.environment["torch"] and job.environment["precision"]
    assert job.wall_seconds > 0 and job.eta_seconds == 0
    assert job.time_limit_seconds > 0


def test_a_second_start_on_a_busy_dataset_is_refused(base_version, dataset_factory):
    from finetuning.services.jobs import JobConflict

    dataset = dataset_factory()
    first = job_start(dataset=dataset, hyperparameters=FAST)
    with pytest.raises(JobConflict, match=f"job {first.pk}"):
        job_start(dataset=dataset, hyperparameters=FAST)
    job_execute(job_id=first.pk)
    assert job_start(dataset=dataset, hyperparameters=FAST).status == "queued"  # free again once it finished


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_starts_on_one_dataset_make_one_job(base_version, dataset_factory):
    import threading

    from django.db import connection

    from finetuning.services.jobs import JobConflict

    dataset = dataset_factory()
    barrier = threading.Barrier(2)
    outcomes = []

    def start():
        barrier.wait()
        try:
            outcomes.append(job_start(dataset=dataset, hyperparameters=FAST).pk)
        except JobConflict as exc:
            outcomes.append(str(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert FineTuningJob.objects.count() == 1
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["int", "str"]


def test_cancelling_a_queued_job_stops_it_before_it_starts(base_version, dataset_factory):
    from finetuning.services.jobs import job_cancel

    job = job_cancel(job=job_start(dataset=dataset_factory(), hyperparameters=FAST))
    assert job.status == "cancelled" and job.finished_at
    assert job_execute(job_id=job.pk) is None  # the queued message arrives anyway
    assert not ModelVersion.objects.filter(job=job).exists()
    with pytest.raises(JobError, match="already cancelled"):
        job_cancel(job=job)


def test_a_cancel_during_training_stops_at_the_next_step_and_leaves_nothing(
    base_version, dataset_factory, model_store, monkeypatch
):
    from finetuning.services import jobs, workers
    from finetuning.services.jobs import job_cancel

    job = job_start(dataset=dataset_factory(), hyperparameters={**FAST, "max_steps": 50})
    real_on_step = jobs._Progress.on_step

    def on_step(self, step, total, loss):
        if step == 3:
            job_cancel(job=FineTuningJob.objects.get(pk=self.job_id))
        return real_on_step(self, step, total, loss)

    monkeypatch.setattr(jobs._Progress, "on_step", on_step)
    monkeypatch.setattr(workers, "CANCEL_CHECK_SECONDS", 0)
    assert job_execute(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == "cancelled" and "cancelled at step 3 of" in job.error and job.step == 3
    assert not ModelVersion.objects.filter(job=job).exists()
    assert ModelVersion.objects.get(is_active=True) == base_version
    assert not any((model_store / "versions").iterdir())


def test_out_of_memory_gets_a_message_a_curator_can_act_on(base_version, dataset_factory, monkeypatch):
    from finetuning import training

    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB")

    monkeypatch.setattr(training, "summed_target_loss", oom)
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    job_execute(job_id=job.pk)
    job.refresh_from_db()
    assert job.status == "failed"
    assert "out of memory on cpu at batch_size=4, max_seq_length=128: lower batch_size" in job.error


def test_the_stale_check_fails_a_running_job_without_heartbeat_and_removes_its_files(
    base_version, dataset_factory, model_store, settings
):
    from datetime import timedelta

    from django.utils import timezone

    from finetuning.services.jobs import jobs_reap_stale

    settings.JOB_STALE_AFTER_SECONDS = 60
    dead = job_start(dataset=dataset_factory(name="dead"), hyperparameters=FAST)
    alive = job_start(dataset=dataset_factory(name="alive"), hyperparameters=FAST)
    now = timezone.now()
    FineTuningJob.objects.filter(pk=dead.pk).update(status="running", heartbeat_at=now - timedelta(seconds=61))
    FineTuningJob.objects.filter(pk=alive.pk).update(status="running", heartbeat_at=now - timedelta(seconds=5))
    partial = model_store / "versions" / f".partial-dead-job{dead.pk}-abcd1234-0000ffff"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half")

    assert jobs_reap_stale() == [dead.pk]
    dead.refresh_from_db()
    alive.refresh_from_db()
    assert dead.status == "failed" and dead.error.startswith("worker lost") and dead.finished_at
    assert alive.status == "running"
    assert not partial.exists()
    assert ModelVersion.objects.get(is_active=True) == base_version


def test_time_limit_grows_with_the_work_and_reaches_celery(
    base_version, dataset_factory, monkeypatch, django_capture_on_commit_callbacks
):
    from finetuning import tasks

    calls = []
    monkeypatch.setattr(tasks.job_run, "apply_async", lambda **kwargs: calls.append(kwargs))
    with django_capture_on_commit_callbacks(execute=True):
        short = job_start(dataset=dataset_factory(name="a"), hyperparameters=FAST)
        long = job_start(dataset=dataset_factory(name="b"), hyperparameters={"epochs": 20})
    assert long.time_limit_seconds > short.time_limit_seconds
    assert calls[0]["args"] == [short.pk]
    assert (calls[0]["soft_time_limit"], calls[0]["time_limit"]) == (
        short.time_limit_seconds,
        short.time_limit_seconds + 300,
    )


# --- Time left ----------------------------------------------------------------------------


def _estimates(step_seconds, *, total, prior=None, window=32):
    """(step, seconds left) after each step, steps taking ``step_seconds`` in turn."""
    from finetuning.services.workers import TimeLeft

    time_left = TimeLeft(total=total, prior_seconds_per_step=prior, window=window)
    now, said = 0.0, []
    for step, seconds in enumerate(step_seconds, start=1):
        now += seconds
        time_left.observe(step, now)
        said.append((now, time_left.estimate(step, now)))
    return said


def test_time_left_does_not_jump_back_when_a_step_is_slow():
    # 1 s a step, then a 40 s validation pass in one step, then 1 s again.
    steps = [1.0] * 40 + [40.0] + [1.0] * 59
    said = [left for _, left in _estimates(steps, total=100)]
    rises = [later - earlier for earlier, later in zip(said[1:-1], said[2:], strict=True)]
    # The rate over the window more than doubles at the slow step: unchecked, the time left
    # would go from 60 s to over 130 s at once.
    assert max(rises) < 15
    assert said[40] < said[39]  # the slow step itself
    assert said[-1] == 0.0


def test_time_left_follows_measured_steps_and_uses_the_last_run_before_any():
    # Before two steps are measured: the last comparable run's speed, not "estimating…".
    first = _estimates([2.0], total=50, prior=2.0)
    assert first[0][1] == pytest.approx(49 * 2.0)
    assert _estimates([2.0], total=50)[0][1] is None
    # Steady at 0.5 s while the last run said 2 s: it comes down to the measured speed at once.
    said = _estimates([0.5] * 20, total=50, prior=2.0)
    assert said[-1][1] == pytest.approx(30 * 0.5)


def test_time_left_in_words_never_reads_zero():
    from finetuning.services.workers import time_left_words

    job = FineTuningJob(status="running", step=5, total_steps=10)
    assert time_left_words(job) == "estimating…"
    job.eta_seconds = 95
    assert time_left_words(job) == "about 1 min 35 s left"
    job.eta_seconds = 3725
    assert time_left_words(job) == "about 1 h 02 min left"
    for past_the_estimate in (0.0, 0.4, 9.0):
        job.eta_seconds = past_the_estimate
        assert time_left_words(job) == "finishing…"
    job.eta_seconds, job.step = 120, 10  # every step done: saving
    assert time_left_words(job) == "finishing…"


def test_a_job_starts_with_the_time_left_of_the_last_comparable_one(base_version, dataset_factory):
    from finetuning.services import jobs
    from finetuning.services.workers import seconds_per_step_prior

    first = job_start(dataset=dataset_factory(name="first"), hyperparameters={**FAST, "max_steps": 4})
    job_execute(job_id=first.pk)
    first.refresh_from_db()
    measured = first.metrics["train_seconds"] / first.metrics["steps"]

    second = job_start(dataset=dataset_factory(name="second"), hyperparameters={**FAST, "max_steps": 6})
    assert second.total_steps == 6  # sized when queued, for the queue's estimates
    assert seconds_per_step_prior(second) == pytest.approx(measured)
    # Twice the tokens a step: twice the time a step.
    bigger = job_start(dataset=dataset_factory(name="bigger"), hyperparameters={**FAST, "batch_size": 8})
    assert seconds_per_step_prior(bigger) == pytest.approx(2 * measured)

    jobs._Progress(second)  # as the worker starts it, before any step
    second.refresh_from_db()
    assert second.eta_seconds == pytest.approx(6 * measured)
