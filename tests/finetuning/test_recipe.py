"""The recipe written with every artifact is a typed contract: what is written is what is read,
and weights made for another prompt format are refused before anyone is served by them."""

import json

import pytest

from finetuning import store
from finetuning.prompts import PROMPT_FORMAT_VERSION
from finetuning.recipe import Recipe, RecipeError
from finetuning.services.jobs import job_execute, job_start
from finetuning.services.versions import VersionError, version_activate


def test_a_recipe_reads_back_as_written(tmp_path):
    recipe = Recipe(
        kind="lora",
        name="shop-job1",
        prompt_format_version=PROMPT_FORMAT_VERSION,
        base_model="tiny-llama",
        base_artifact="base/tiny-llama",
        base_sha256="ab" * 32,
        hyperparameters={"lora_r": 16},
    )
    store.recipe_write(tmp_path, recipe)
    assert store.recipe_read(tmp_path) == recipe
    assert recipe.is_adapter


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ({"kind": "lora", "name": "x", "prompt_format_version": 1}, "base_artifact: a LoRA recipe names"),
        ({"kind": "qlora", "name": "x", "prompt_format_version": 1}, "kind: 'qlora' is not one of"),
        ({"kind": "full", "name": "x"}, "prompt_format_version: missing"),
        ({"kind": "full", "name": "x", "prompt_format_version": 1, "lr": 3}, "lr: not a recipe field"),
    ],
)
def test_a_malformed_recipe_is_refused_naming_the_field(tmp_path, written, reason):
    (tmp_path / store.RECIPE).write_text(json.dumps(written))
    with pytest.raises(store.ArtifactError, match=f"genapi.json is not a recipe: {reason}"):
        store.recipe_read(tmp_path)


def test_weights_made_for_another_prompt_format_are_not_activated(dataset_factory, base_version):
    job = job_start(dataset=dataset_factory(), hyperparameters={"max_steps": 2, "batch_size": 4, "max_seq_length": 128})
    version = job_execute(job_id=job.pk)
    directory = store.absolute(version.artifact_path)
    recipe = json.loads((directory / store.RECIPE).read_text())
    (directory / store.RECIPE).write_text(json.dumps({**recipe, "prompt_format_version": PROMPT_FORMAT_VERSION + 1}))
    version.sha256 = store.manifest_write(directory)
    version.save(update_fields=["sha256"])
    with pytest.raises(VersionError, match=f"made with prompt format {PROMPT_FORMAT_VERSION + 1}; this genapi builds"):
        version_activate(version=version)
    assert base_version.__class__.objects.get(is_active=True) == base_version


def test_recipe_errors_say_the_field():
    with pytest.raises(RecipeError, match="^kind: "):
        Recipe(kind="", name="x", prompt_format_version=1)
