import gc
import json
import subprocess
import sys
import threading
import weakref

import pytest
import torch

from finetuning import prompts, store
from finetuning.models import ModelVersion
from inference import engine as engine_module
from inference import loader
from inference.engine.params import GenerationParams
from inference.generation import generate, generation_collect, generation_submit


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


GREEDY = GenerationParams(max_new_tokens=20)
PROMPT = prompts.product_prompt({"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"})


def _answer(loaded):
    [completion] = generate(loaded, PROMPT, GREEDY).completions
    return completion.text, completion.tokens


def test_the_quantize_setting_reaches_the_weights(base_version, settings):
    settings.INFERENCE_QUANTIZE = "int8"
    loaded = loader.model_get(base_version)
    assert loaded.weights.decoder.layers[0].qkv.weight.dtype == torch.int8
    [completion] = generate(loaded, PROMPT, GREEDY).completions
    assert completion.finish_reason in ("stop", "length") and completion.tokens > 0
    loader.cache_clear()
    settings.INFERENCE_QUANTIZE = "int4"  # a typo in the environment: refused with a reason, not a crash
    with pytest.raises(loader.ModelUnavailable, match="quantize"):
        loader.model_get(base_version)


def _fresh_base(base_version):
    from transformers import AutoModelForCausalLM

    directory = store.absolute(base_version.artifact_path)
    return AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=torch.float32).eval()


def _peft(lora, base_version, *, merged):
    """How PEFT serves a LoRA version on its own: the adapter on a base model of its own."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_fresh_base(base_version), store.absolute(lora.artifact_path)).eval()
    return model.merge_and_unload() if merged else model


def _decoder_storages(decoder):
    """data_ptr -> element count of every tensor the engine decodes with (the rotary tables aside)."""
    tensors = [decoder.embed.dense, decoder.norm, decoder.lm_head.dense]  # the tiny model's are no GGUF blocks
    for layer in decoder.layers:
        tensors += [layer.input_norm, layer.post_norm]
        tensors += [p.dense for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    return {t.untyped_storage().data_ptr(): t.numel() for t in tensors}


def test_lora_versions_and_the_base_share_one_copy_of_the_base_weights(base_version, loras, monkeypatch):
    models = []
    original = engine_module.DecoderWeights.__init__

    def spy(self, model, **kwargs):
        models.append(weakref.ref(model))
        original(self, model, **kwargs)

    monkeypatch.setattr(engine_module.DecoderWeights, "__init__", spy)
    versions = [base_version, *loras]
    loaded = [loader.model_get(v) for v in versions]
    assert loader.loaded_version_ids() == [v.pk for v in versions]
    assert loader.loaded_weights_paths() == [base_version.artifact_path]
    assert len(models) == 1, "the base weights were read more than once"
    assert len({id(m.weights) for m in loaded}) == 1 and len({id(m.engine) for m in loaded}) == 1
    assert loaded[0].adapter is None and loaded[1].adapter is not loaded[2].adapter is not None
    # In memory: the base's weights once (the tied embedding and output head one tensor, as in the checkpoint),
    # and not the transformers model they were read from as well.
    base_size = sum(p.numel() for p in _fresh_base(base_version).parameters())
    assert sum(_decoder_storages(loaded[0].weights.decoder).values()) == base_size
    gc.collect()
    assert models[0]() is None, "the transformers model is kept alive next to the decoder's copy of its weights"


def test_each_version_answers_as_if_it_were_served_alone(base_version, loras, hf_generate):
    """The engine, its shared base and per-row adapters give the text PEFT gives with the adapter on a base of its own."""
    first, second = loras
    like = loader.model_get(base_version)
    prompt_ids = like.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]

    def served_alone(model):
        ids, text = hf_generate(
            model, like.tokenizer, prompt_ids, stop_ids=like.stop_token_ids, max_new_tokens=GREEDY.max_new_tokens
        )
        return text, len(ids)

    expected = {
        base_version.pk: served_alone(_fresh_base(base_version)),
        first.pk: served_alone(_peft(first, base_version, merged=False)),
        second.pk: served_alone(_peft(second, base_version, merged=True)),
    }
    assert len(set(expected.values())) == 3, "the adapters must change the answer, or this test proves nothing"
    # Interleaved, so that an adapter left applied would show in the next answer.
    for version in (first, base_version, second, first, base_version, second):
        assert _answer(loader.model_get(version)) == expected[version.pk], version.name


def test_versions_on_one_base_share_a_batch_across_threads(base_version, loras, monkeypatch):
    versions = [base_version, *loras]
    expected = {v.pk: _answer(loader.model_get(v)) for v in versions}
    engine = loader.model_get(base_version).engine
    mixes = []  # at each forward pass, the adapters of the sequences in the batch
    adapter_rows = engine._adapter_rows

    def recording(slots=None):
        mixes.append(len({id(sequence.adapter) for sequence in engine._active}))
        return adapter_rows(slots)

    monkeypatch.setattr(engine, "_adapter_rows", recording)
    answers, errors = [], []
    start = threading.Barrier(len(versions))

    def ask(version):
        try:
            start.wait()
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
    assert max(mixes) >= 2, "the versions never shared a batch: this test proved nothing"


def test_the_least_recently_used_version_and_its_adapter_are_evicted(base_version, loras, settings):
    settings.INFERENCE_MAX_LOADED_VERSIONS = 2
    first, second = loras
    first_loaded = loader.model_get(first)
    shared = first_loaded.weights
    loader.model_get(base_version)
    loader.model_get(first)  # used again: the base version is now the least recently used
    second_loaded = loader.model_get(second)
    assert loader.loaded_version_ids() == [first.pk, second.pk]
    # The LoRA versions still need the base weights: they stay, once, with the same engine.
    assert second_loaded.weights is shared and not shared.engine._closing
    assert loader.loaded_weights_paths() == [base_version.artifact_path]

    base_loaded = loader.model_get(base_version)
    assert loader.loaded_version_ids() == [second.pk, base_version.pk]
    assert base_loaded.weights is shared
    # The first version went, adapter and all: asked for again, it is read again (and evicts the second).
    assert loader.model_get(first) is not first_loaded
    assert loader.loaded_version_ids() == [base_version.pk, first.pk]


def test_a_base_model_no_version_uses_is_freed(base_version, loras, full, settings):
    settings.INFERENCE_MAX_LOADED_VERSIONS = 1
    weights = loader.model_get(loras[0]).weights
    engine, decoder = weights.engine, weakref.ref(weights.decoder)
    del weights
    loader.model_get(full)  # a full fine-tune has weights of its own: the LoRA version goes, and its base with it
    assert loader.loaded_version_ids() == [full.pk]
    assert loader.loaded_weights_paths() == [full.artifact_path]
    engine._thread.join(timeout=10)
    assert not engine._thread.is_alive(), "the unloaded weights' scheduler thread still runs"
    with pytest.raises(engine_module.EngineClosed):
        engine.submit(prompt_ids=[1, 2], sampling=GenerationParams(), max_new_tokens=1, timeout=5)
    del engine
    gc.collect()
    assert decoder() is None, "the unloaded base model's weights are still in memory"


def test_a_version_evicted_while_a_request_holds_it_still_answers(base_version, loras, full, settings):
    settings.INFERENCE_MAX_LOADED_VERSIONS = 1
    first, second = loras
    held = loader.model_get(first)
    expected = _answer(held)
    assert _answer(loader.model_get(second)) != expected  # evicts the first version; the base weights stay
    assert loader.loaded_version_ids() == [second.pk]
    assert _answer(held) == expected

    # A request in flight when its weights are unloaded finishes; the next one on the held version loads it again.
    in_flight = generation_submit(held, PROMPT, GREEDY)
    loader.model_get(full)
    assert loader.loaded_weights_paths() == [full.artifact_path]
    [completion] = generation_collect(*in_flight).completions
    assert (completion.text, completion.tokens) == expected
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


def test_a_starting_web_process_loads_the_active_version(base_version):
    from inference.services.generation import active_version_warm

    loaded = active_version_warm()
    assert loaded is not None and loaded.version_id == base_version.pk
    assert loader.loaded_version_ids() == [base_version.pk]


def test_a_starting_web_process_survives_an_active_version_that_cannot_load(base_version, model_store, caplog):
    from inference.services.generation import active_version_warm

    (model_store / base_version.artifact_path / "model.safetensors").write_bytes(b"damaged")
    assert active_version_warm() is None
    assert base_version.name in caplog.text
    assert loader.loaded_version_ids() == []
