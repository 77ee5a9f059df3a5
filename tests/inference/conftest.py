"""Fixtures for the serving tests: LoRA versions trained by real jobs (once per
session), and plain transformers generation, the reference every answer of
the serving engine is held to."""

import json
import shutil

import pytest

from finetuning.models import Dataset, FineTuningJob, ModelVersion
from finetuning.services.examples import example_create
from finetuning.services.jobs import job_execute, job_start

# Large learning rate, enough steps: every adapter must really change the answer of the tiny model, or the tests
# comparing answers prove nothing.
LORA = {"max_steps": 8, "batch_size": 4, "max_seq_length": 128, "learning_rate": 1e-2}


@pytest.fixture(scope="session")
def _trained():
    """Artifacts trained by earlier tests, by (dataset name, hyperparameters): training is the slow part."""
    return {}


@pytest.fixture
def train(base_version, model_store, _trained, tmp_path_factory):
    """A version trained by a real job; the same dataset name must always mean the same examples."""

    def make(dataset, **hyperparameters):
        hyperparameters = {**LORA, **hyperparameters}
        key = (dataset.name, json.dumps(hyperparameters, sort_keys=True))
        if key in _trained:
            fields, saved = _trained[key]
            shutil.copytree(saved, model_store / fields["artifact_path"])
            return ModelVersion.objects.create(**fields)
        job = job_start(dataset=dataset, hyperparameters=hyperparameters)
        version = job_execute(job_id=job.pk)
        assert version is not None, FineTuningJob.objects.get(pk=job.pk).error
        saved = tmp_path_factory.mktemp("trained") / "artifact"
        shutil.copytree(model_store / version.artifact_path, saved)
        names = ("name", "kind", "base_model", "artifact_path", "sha256", "prompt_format_version", "hyperparameters")
        _trained[key] = ({name: getattr(version, name) for name in names}, saved)
        return version

    return make


@pytest.fixture
def loras(train, dataset_factory, settings):
    """Two LoRA versions that answer differently: trained on different descriptions."""
    settings.INFERENCE_MAX_LOADED_VERSIONS = 3  # the base version and both LoRA versions
    toys = Dataset.objects.create(name="toys")
    for i in range(24):
        example_create(
            dataset=toys,
            attributes={"name": f"Toy {i}", "category": "Toys"},
            description=f"Wow! Zany zebra toy number {i}, bright and bouncy.",
        )
    return train(dataset_factory(name="shop"), seed=1), train(toys, seed=2)


@pytest.fixture
def full(train, dataset_factory):
    """A full fine-tune: weights of its own, no base model needed at serving time."""
    return train(dataset_factory(name="full"), method="full", learning_rate=1e-4)


@pytest.fixture(scope="session")
def hf_generate():
    return _hf_generate


def _hf_generate(model, tokenizer, prompt_ids, *, stop_ids, max_new_tokens, repetition_penalty=1.0):
    """What serving did before the engine: transformers' greedy `generate`, its new
    tokens up to and including the first stop id, the text decoded without special
    tokens and stripped. Returns (token ids, text)."""
    import torch

    input_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=repetition_penalty,
            eos_token_id=list(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
    row = output[0, len(prompt_ids) :].tolist()
    cut = next((i for i, token in enumerate(row) if token in stop_ids), None)
    text_ids = row if cut is None else row[:cut]
    return (row if cut is None else row[: cut + 1]), tokenizer.decode(text_ids, skip_special_tokens=True).strip()
