import gc
import json
import shutil
import subprocess
import sys
import threading
import weakref
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from finetuning import prompts, store
from finetuning.models import Dataset, FineTuningJob, ModelVersion
from finetuning.services.examples import example_create
from finetuning.services.jobs import job_execute, job_start
from inference import loader
from inference.generation import GenerationParams, generate


def test_a_version_loads_once_and_is_cached(base_version):
    first = loader.model_get(base_version)
    assert loader.model_get(base_version) is first
    assert loader.loaded_version_ids() == [base_version.pk]


def test_the_cache_keeps_at_most_the_configured_number_of_versions(base_version, settings):
    settings.INFERENCE_MAX_LOADED_VERSIONS = 1
    twin = ModelVersion.objects.create(
        name="twin", kind="base", base_model="tiny-llama", artifact_path=base_version.artifact_path,
        sha256=base_version.sha256, prompt_format_version=1,
    )  # fmt: skip
    loader.model_get(base_version)
    loader.model_get(twin)
    assert loader.loaded_version_ids() == [twin.pk]


def test_a_tampered_artifact_is_refused(base_version, model_store):
    with open(model_store / base_version.artifact_path / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\0")
    with pytest.raises(loader.ModelUnavailable, match="sha256"):
        loader.model_get(base_version)


def test_django_starts_without_importing_torch():
    """Models load lazily: neither settings, apps, urls nor admin pull in torch."""
    code = (
        "import django, sys; django.setup(); "
        "from django.urls import resolve; resolve('/api/generate'); "
        "import finetuning.admin, inference.api; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"DJANGO_SETTINGS_MODULE": "genapi.settings.test", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "False"


# LoRA versions on the shared base model. Large learning rate, enough steps: every adapter must really change the
# answer of the tiny model, or the tests comparing answers prove nothing.
LORA = {"max_steps": 8, "batch_size": 4, "max_seq_length": 128, "learning_rate": 1e-2}
GREEDY = GenerationParams(max_new_tokens=20)
PROMPT = prompts.product_prompt({"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"})


@pytest.fixture(scope="session")
def _trained(tmp_path_factory):
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


def _answer(loaded):
    [completion] = generate(loaded, PROMPT, GREEDY).completions
    return completion.text, completion.tokens


def _alone(model, like):
    """``model`` outside the loader, generated from exactly as the loader's models are."""
    return SimpleNamespace(
        tokenizer=like.tokenizer,
        stop_token_ids=like.stop_token_ids,
        max_positions=like.max_positions,
        use=lambda: nullcontext(model),
    )


def _fresh_base(base_version):
    from transformers import AutoModelForCausalLM

    directory = store.absolute(base_version.artifact_path)
    return AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=torch.float32).eval()


def _merged(lora, base_version):
    """What serving did before adapters were shared: the adapter merged into a copy of the base of its own."""
    from peft import PeftModel

    return PeftModel.from_pretrained(_fresh_base(base_version), store.absolute(lora.artifact_path)).merge_and_unload()


def _adapter_size(version):
    from safetensors.torch import load_file

    weights = load_file(store.absolute(version.artifact_path) / "adapter_model.safetensors")
    return sum(tensor.numel() for tensor in weights.values())


def _parameters(loaded):
    with loaded.use() as model:
        return {p.data_ptr(): p.numel() for p in model.parameters()}


def test_lora_versions_and_the_base_share_one_copy_of_the_base_weights(base_version, loras):
    versions = [base_version, *loras]
    loaded = [loader.model_get(v) for v in versions]
    assert loader.loaded_version_ids() == [v.pk for v in versions]
    assert loader.loaded_weights_paths() == [base_version.artifact_path]
    assert len({id(m.base_model) for m in loaded}) == 1
    embeddings = set()
    for m in loaded:
        with m.use() as model:
            embeddings.add(model.get_input_embeddings().weight.data_ptr())
    assert len(embeddings) == 1
    # In memory: the base once, and the two adapters; no second or third copy of the base.
    base_size = sum(p.numel() for p in _fresh_base(base_version).parameters())
    adapters_size = sum(_adapter_size(v) for v in loras)
    in_memory = {}
    for m in loaded:
        in_memory.update(_parameters(m))
    assert sum(in_memory.values()) == base_size + adapters_size


def test_each_version_answers_as_if_it_were_served_alone(base_version, loras):
    first, second = loras
    like = loader.model_get(base_version)
    expected = {
        base_version.pk: _answer(_alone(_fresh_base(base_version), like)),
        first.pk: _answer(_alone(_merged(first, base_version), like)),
        second.pk: _answer(_alone(_merged(second, base_version), like)),
    }
    assert len(set(expected.values())) == 3, "the adapters must change the answer, or this test proves nothing"
    # Interleaved, so that an adapter left selected or enabled would show in the next answer.
    for version in (first, base_version, second, first, base_version, second):
        assert _answer(loader.model_get(version)) == expected[version.pk], version.name


def test_versions_on_one_base_take_turns_across_threads(base_version, loras):
    versions = [base_version, *loras]
    expected = {v.pk: _answer(loader.model_get(v)) for v in versions}
    answers, errors = [], []

    def ask(version):
        try:
            for _ in range(3):
                answers.append((version.pk, _answer(loader.model_get(version))))
        except Exception as exc:  # reported below: an exception in a thread would pass silently
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(answers) == 9 and all(answer == expected[pk] for pk, answer in answers)


def test_the_least_recently_used_version_and_its_adapter_are_evicted(base_version, loras, settings):
    settings.INFERENCE_MAX_LOADED_VERSIONS = 2
    first, second = loras
    shared = loader.model_get(first).base_model
    loader.model_get(base_version)
    loader.model_get(first)  # used again: the base version is now the least recently used
    second_loaded = loader.model_get(second)
    assert loader.loaded_version_ids() == [first.pk, second.pk]
    # The LoRA versions still need the base weights: they stay, once.
    assert second_loaded.base_model is shared
    assert loader.loaded_weights_paths() == [base_version.artifact_path]

    base_loaded = loader.model_get(base_version)
    assert loader.loaded_version_ids() == [second.pk, base_version.pk]
    assert base_loaded.base_model is shared
    with second_loaded.use() as model:
        assert set(model.peft_config) == {second_loaded.adapter}  # the first adapter is gone


def test_a_base_model_no_version_uses_is_freed(base_version, train, dataset_factory, settings):
    settings.INFERENCE_MAX_LOADED_VERSIONS = 1
    lora = train(dataset_factory(name="shop"))
    full = train(dataset_factory(name="full"), method="full", learning_rate=1e-4)
    base_weights = weakref.ref(loader.model_get(lora).base_model)
    loader.model_get(full)  # a full fine-tune has weights of its own: the LoRA version goes, and its base with it
    assert loader.loaded_version_ids() == [full.pk]
    assert loader.loaded_weights_paths() == [full.artifact_path]
    gc.collect()
    assert base_weights() is None


def test_a_version_evicted_while_a_request_holds_it_still_answers(base_version, loras, settings):
    settings.INFERENCE_MAX_LOADED_VERSIONS = 1
    first, second = loras
    held = loader.model_get(first)
    expected = _answer(held)
    assert _answer(loader.model_get(second)) != expected  # evicts the first version and deletes its adapter
    assert loader.loaded_version_ids() == [second.pk]
    assert _answer(held) == expected
    assert loader.loaded_version_ids() == [first.pk]


def test_a_lora_version_is_refused_when_its_base_model_changed(base_version, loras, model_store):
    manifest = model_store / base_version.artifact_path / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "sha256": "0" * 64}))
    with pytest.raises(loader.ModelUnavailable, match="not the one it was trained on"):
        loader.model_get(loras[0])


def test_an_adapter_saved_as_a_pickle_is_never_loaded(base_version, train, dataset_factory):
    lora = train(dataset_factory(name="shop"), max_steps=1)
    directory = store.absolute(lora.artifact_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    lora.sha256 = store.manifest_write(directory)
    lora.save()
    with pytest.raises(loader.ModelUnavailable, match="adapter_model.safetensors"):
        loader.model_get(lora)
