"""The fine-tune pre-flight: its counts are the training's own, and its estimate comes
from measured jobs or says that nothing is measured yet."""

import math

import pytest

from finetuning.hyperparameters import hyperparameters_parse
from finetuning.models import Dataset, FineTuningJob
from finetuning.services.examples import example_create
from finetuning.services.jobs import job_execute, job_start
from finetuning.services.preflight import duration_text, preflight_check, preflight_refusal

FEATURES = ["solid oak", "stacks neatly", "easy care", "water resistant", "made in Portugal", "recycled wood"]


def mixed_dataset(name="mixed", count=30):
    """Examples whose prompts (0 to 6 features) and descriptions (1 to 5 sentences) differ in
    length, so that at 100 tokens some fit whole, some are cut short and some are skipped, in
    both splits. Every third description does not name its product: training opens those
    with the name, validation keeps them as written."""
    dataset = Dataset.objects.create(name=name)
    for i in range(count):
        sentences = " ".join(["Sturdy and light."] * (1 + i % 5))
        example_create(
            dataset=dataset,
            attributes={"name": f"Stool {i}", "category": "Furniture", "price": 20 + i, "features": FEATURES[: i % 7]},
            description=sentences if i % 3 == 0 else f"Stool {i}: {sentences}",
            split="validation" if i % 5 == 0 else "unassigned",
        )
    return dataset


@pytest.mark.django_db
def test_preflight_counts_equal_what_training_skips_and_truncates(base_version):
    dataset = mixed_dataset()
    hp = hyperparameters_parse({"max_seq_length": 100, "max_steps": 2, "batch_size": 4, "lora_r": 4})
    preflight = preflight_check(dataset=dataset, hp=hp)
    # The data really is mixed at 100 tokens: some skipped, some cut short, some whole, on both sides.
    assert preflight.examples == 30 and preflight.validation_examples >= 6
    assert preflight.skipped_train and preflight.truncated_train
    assert preflight.skipped_validation and preflight.truncated_validation
    assert preflight.skipped + preflight.truncated < preflight.examples
    assert preflight.longest > 100 and preflight.most <= preflight.longest

    job = job_start(dataset=dataset, hyperparameters=hp.as_dict())
    job_execute(job_id=job.pk)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert job.metrics["skipped_examples"] == preflight.skipped
    assert job.metrics["truncated_examples"] == preflight.truncated
    assert job.metrics["train_examples"] == preflight.train_examples - preflight.skipped_train
    assert job.metrics["validation_examples"] == preflight.validation_examples - preflight.skipped_validation


@pytest.mark.django_db
def test_the_estimate_comes_from_measured_jobs_and_says_when_there_are_none(base_version):
    dataset = mixed_dataset()
    hp = hyperparameters_parse({"max_seq_length": 256, "max_steps": 3, "batch_size": 4, "lora_r": 4})
    before = preflight_check(dataset=dataset, hp=hp)
    assert before.skipped == 0 and before.truncated == 0
    assert before.estimate.seconds is None
    assert "no estimate yet" in before.estimate.basis and "lora" in before.estimate.basis

    job = job_start(dataset=dataset, hyperparameters=hp.as_dict())
    job_execute(job_id=job.pk)
    after = preflight_check(dataset=dataset, hp=hp)
    assert after.estimate.seconds is not None and after.estimate.seconds > 0
    assert (
        f"job {job.pk}" in after.estimate.basis and " tokens/s, the speed of the last lora job" in after.estimate.basis
    )
    # Twice the steps take longer; a full fine-tune has not been measured.
    longer = preflight_check(dataset=dataset, hp=hyperparameters_parse({**hp.as_dict(), "max_steps": 6}))
    assert longer.estimate.seconds > after.estimate.seconds
    full = preflight_check(dataset=dataset, hp=hyperparameters_parse({**hp.as_dict(), "method": "full"}))
    assert full.estimate.seconds is None


@pytest.mark.django_db
def test_jobs_from_before_every_token_was_counted_still_give_an_estimate(base_version):
    from django.utils import timezone

    dataset = mixed_dataset()
    finished = timezone.now()
    old = FineTuningJob.objects.create(
        dataset=dataset,
        base_model=base_version.base_model,
        hyperparameters={"method": "lora"},
        status="succeeded",
        metrics={"target_tokens_per_second": 50.0, "train_seconds": 100.0, "seconds": 110.0, "steps": 20},
        started_at=finished - timezone.timedelta(seconds=120),
        finished_at=finished,
    )
    preflight = preflight_check(dataset=dataset, hp=hyperparameters_parse({"max_steps": 10, "batch_size": 4}))
    assert f"at 50 description tokens/s, the speed of the last lora job (tiny-llama; job {old.pk})" in (
        preflight.estimate.basis
    )
    # The description tokens of 10 steps (of an epoch's) at 50 a second, and the 20 s the job spent outside its loop.
    assert preflight.skipped == 0
    steps_per_epoch = math.ceil(preflight.train_examples / 4)
    expected = preflight.trained_description_tokens * 10 / steps_per_epoch / 50 + 20
    assert preflight.estimate.seconds == pytest.approx(expected)


@pytest.mark.django_db
def test_skipping_more_than_the_share_is_refused_unless_confirmed_for_the_same_numbers(base_version, settings):
    settings.PREFLIGHT_MAX_SKIPPED_SHARE = 0.05
    dataset = mixed_dataset()
    preflight = preflight_check(dataset=dataset, hp=hyperparameters_parse({"max_seq_length": 100}))
    assert preflight.skipped_share > 0.05 and preflight.needs_confirmation
    refusal = preflight_refusal(preflight)
    assert f"{preflight.skipped} of 30 examples" in refusal
    assert f"Train anyway on {preflight.kept} of 30 examples" in refusal
    assert f"all fit at {preflight.longest}" in refusal
    assert preflight_refusal(preflight, confirmed_examples=preflight.kept + 1) == refusal
    assert preflight_refusal(preflight, confirmed_examples=preflight.kept) is None

    settings.PREFLIGHT_MAX_SKIPPED_SHARE = 0.9
    assert (
        preflight_refusal(preflight_check(dataset=dataset, hp=hyperparameters_parse({"max_seq_length": 100}))) is None
    )


@pytest.mark.django_db
def test_nothing_fits_is_refused_even_when_confirmed(base_version):
    dataset = mixed_dataset()
    preflight = preflight_check(dataset=dataset, hp=hyperparameters_parse({"max_seq_length": 32}))
    assert preflight.skipped == preflight.examples and preflight.trains_nothing
    assert preflight.steps == 0 and preflight.estimate.seconds is None
    refusal = preflight_refusal(preflight, confirmed_examples=0)
    assert "Not one of the" in refusal and f"up to {preflight.longest_prompt} tokens" in refusal


@pytest.mark.django_db
def test_without_a_prepared_base_model_the_preflight_says_why(settings, tmp_path, dataset_factory):
    settings.MODEL_STORE = tmp_path / "empty-store"
    preflight = preflight_check(dataset=dataset_factory(), hp=hyperparameters_parse({}))
    assert preflight.examples == 24 and not preflight.tokenized
    assert "is not prepared" in preflight.problem
    assert preflight_refusal(preflight) is None  # job_start refuses with its own message


def test_durations_read_as_a_person_says_them():
    assert duration_text(0.2) == "about 1 s"
    assert duration_text(42) == "about 42 s"
    assert duration_text(12 * 60 + 10) == "about 12 min"
    assert duration_text(80 * 60) == "about 80 min"
    assert duration_text(2 * 3600 + 5 * 60) == "about 2 h 05 min"
