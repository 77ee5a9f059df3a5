"""`manage.py activate`: the admin's Activate button from the shell."""

import pytest
from django.core.management import CommandError, call_command

from finetuning.models import Activation, ModelVersion


def test_activate_makes_a_version_serve_and_records_why(base_version, capsys):
    other = ModelVersion.objects.create(
        name="other", kind=base_version.kind, base_model=base_version.base_model,
        artifact_path=base_version.artifact_path, sha256=base_version.sha256,
        prompt_format_version=base_version.prompt_format_version,
    )  # fmt: skip
    call_command("activate", "other", "--reason", "the demo")
    assert "other is now the active version." in capsys.readouterr().out
    assert ModelVersion.objects.get(is_active=True) == other
    assert Activation.objects.latest("id").reason == "the demo"
    with pytest.raises(CommandError, match="no model version named 'nope'"):
        call_command("activate", "nope", "--reason", "x")
    with pytest.raises(CommandError, match="--reason: say why"):
        call_command("activate", "other", "--reason", "  ")
