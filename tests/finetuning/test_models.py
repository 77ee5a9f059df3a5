import pytest
from django.db import IntegrityError, transaction

from finetuning.models import ModelVersion, TrainingExample
from finetuning.services.examples import ExampleError, example_create
from finetuning.services.versions import VersionError, version_activate, version_register


def _version(name, store_dir, sha="0" * 64):
    return ModelVersion.objects.create(
        name=name, kind="lora", base_model="tiny", artifact_path=f"versions/{name}", sha256=sha, prompt_format_version=1
    )


@pytest.mark.django_db
def test_database_allows_at_most_one_active_version(tmp_path):
    a = _version("a", tmp_path)
    b = _version("b", tmp_path)
    ModelVersion.objects.filter(pk=a.pk).update(is_active=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelVersion.objects.filter(pk=b.pk).update(is_active=True)
    assert list(ModelVersion.objects.filter(is_active=True)) == [a]


def test_activating_moves_the_single_active_flag(base_version, model_store):
    from finetuning import store
    from finetuning.prompts import PROMPT_FORMAT_VERSION
    from finetuning.recipe import Recipe

    relpath = "versions/other"
    directory = store.absolute(relpath)
    directory.mkdir(parents=True)
    (directory / "weights.safetensors").write_bytes(b"x")
    store.recipe_write(directory, Recipe(kind="full", name="other", prompt_format_version=PROMPT_FORMAT_VERSION))
    sha = store.manifest_write(directory)
    other = version_register(
        name="other", kind="lora", base_model="tiny", relpath=relpath, sha256=sha, hyperparameters={}, metrics={}
    )
    assert base_version.is_active
    version_activate(version=other)
    assert list(ModelVersion.objects.filter(is_active=True).values_list("name", flat=True)) == ["other"]
    other.refresh_from_db()
    assert other.activated_at is not None


def test_activation_refuses_a_damaged_artifact_and_keeps_the_active_version(base_version, model_store):
    broken = _version("broken", model_store)
    with pytest.raises(VersionError):
        version_activate(version=broken)
    assert ModelVersion.objects.get(is_active=True) == base_version


@pytest.mark.django_db
def test_database_rejects_duplicate_examples_in_a_dataset(dataset_factory):
    dataset = dataset_factory(examples=1)
    example = dataset.examples.get()
    with pytest.raises(IntegrityError), transaction.atomic():
        TrainingExample.objects.create(
            dataset=dataset,
            attributes=example.attributes,
            description=example.description,
            content_hash=example.content_hash,
        )


@pytest.mark.django_db
def test_service_reports_a_duplicate_even_when_written_differently(dataset_factory):
    dataset = dataset_factory(examples=0)
    example_create(dataset=dataset, attributes={"name": "Mug", "price": 5}, description="A mug.")
    with pytest.raises(ExampleError) as info:
        example_create(dataset=dataset, attributes={"name": " Mug", "price": "5.00"}, description="A  mug. ")
    assert info.value.field == "description"
    assert "already in" in info.value.message


@pytest.mark.django_db
def test_the_same_example_may_live_in_two_datasets(dataset_factory):
    first, second = dataset_factory(name="a", examples=0), dataset_factory(name="b", examples=0)
    example_create(dataset=first, attributes={"name": "Mug"}, description="A mug.")
    example_create(dataset=second, attributes={"name": "Mug"}, description="A mug.")
    assert TrainingExample.objects.count() == 2
