import subprocess
import sys

import pytest

from finetuning.models import ModelVersion
from inference import loader


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
