"""The serving folder and what the serving image runs from it: one version, its own SQLite
registry, no PostgreSQL, Redis or Celery; the same text as the full service."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from django.core.management import CommandError, call_command

from finetuning import store
from finetuning.models import ModelVersion
from finetuning.services.serving import MANIFEST, ServingError, serving_export, serving_install
from inference.models import ApiKey
from inference.services.keys import ApiKeyError, key_create, keys_install
from tests.server import web_process
from tests.worker import REPO

BODY = {"product": {"name": "Trail Runner", "category": "Shoes", "color": "blue"}, "max_new_tokens": 12}


def _post(url, body, key):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _serving_env(folder, tmp_path, **extra):
    """The serving image's environment, outside Docker: nothing listens at the broker's address."""
    return {
        "DJANGO_SETTINGS_MODULE": "genapi.settings.serving",
        "GENAPI_VAR_DIR": str(tmp_path / "serving-var"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'serving.sqlite3'}",
        "CELERY_BROKER_URL": "redis://127.0.0.1:9/0",
        "CACHE_URL": "locmemcache://serving",
        "MODEL_STORE": str(folder / "models"),
        "SECRET_KEY": "serving-test-" + "k" * 50,
        "SECURE_SSL_REDIRECT": "false",
        **extra,
    }


def _manage(env, *args):
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True
    )


@pytest.mark.django_db(transaction=True)
def test_the_serving_folder_answers_alone_with_the_full_services_text(loras, client, auth, tmp_path):
    version = loras[1]
    key = auth["HTTP_AUTHORIZATION"].split()[1]
    sampled = {**BODY, "model_version": version.name, "temperature": 0.9, "seed": 11}
    greedy = {**BODY, "model_version": version.name}
    full = [
        client.post("/api/generate", body, content_type="application/json", **auth).json() for body in (greedy, sampled)
    ]

    folder = tmp_path / "export"
    call_command("export_serving", version.name, output=str(folder))
    manifest = json.loads((folder / MANIFEST).read_text())
    # A LoRA version travels with the base weights it was trained on.
    assert sorted(manifest["artifacts"]) == sorted([version.artifact_path, store.base_relpath(version.base_model)])

    env = _serving_env(folder, tmp_path, SERVING_API_KEYS=key)
    for command in (["migrate", "--noinput", "-v", "0"], ["install_serving", str(folder)]):
        result = _manage(env, *command)
        assert result.returncode == 0, result.stderr
    assert f"Registered and activated {version.name}" in result.stdout

    with web_process(tmp_path / "serving.log", config=True, **env) as url:
        answers = [_post(f"{url}/api/generate", body, key) for body in (greedy, sampled)]
        assert [status for status, _ in answers] == [200, 200], answers
        assert [answer["choices"] for _, answer in answers] == [answer["choices"] for answer in full]
        assert {answer["model_version"]["name"] for _, answer in answers} == {version.name}
        # The version is the active one there: a request that names none gets it.
        assert _post(f"{url}/api/generate", BODY, key)[1]["choices"] == full[0]["choices"]
        status, chat = _post(
            f"{url}/v1/chat/completions",
            {
                "model": version.name,
                "messages": [{"role": "user", "content": "Write about a blue shoe."}],
                "max_tokens": 4,
            },
            key,
        )
        assert status == 200 and chat["choices"][0]["message"]["content"], chat
        assert _post(f"{url}/api/generate", BODY, "gk_00000000_not-a-key")[0] == 401
        with urllib.request.urlopen(f"{url}/api/ready", timeout=10) as response:
            assert json.loads(response.read())["ready"] is True
        # No admin and no fine-tuning API: nothing behind them here.
        for path in ("/admin/", "/api/jobs"):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(f"{url}{path}", timeout=10)
            assert missing.value.code == 404


def test_a_damaged_version_is_not_exported_and_leaves_no_folder(loras, tmp_path):
    version = loras[0]
    weights = store.absolute(version.artifact_path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    exports = tmp_path / "exports"
    exports.mkdir()
    with pytest.raises(ServingError, match="cannot export .*does not match its sha256"):
        serving_export(version=version, output=exports / "shop")
    assert list(exports.iterdir()) == []


def test_install_refuses_files_that_are_not_the_exported_ones(loras, tmp_path, settings):
    version = loras[0]
    folder = tmp_path / "export"
    serving_export(version=version, output=folder)
    settings.MODEL_STORE = tmp_path / "elsewhere"
    with pytest.raises(ServingError, match=f"set it to {folder / 'models'}"):
        serving_install(directory=folder)
    settings.MODEL_STORE = folder / "models"
    tokenizer = folder / "models" / store.base_relpath(version.base_model) / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("<|im_end|>", "<|im_END|>"))
    with pytest.raises(ServingError, match="tokenizer.json does not match its sha256"):
        serving_install(directory=folder)
    assert not ModelVersion.objects.filter(is_active=True, name=version.name).exists()


def test_export_says_which_version_it_cannot_find(db, tmp_path):
    with pytest.raises(CommandError, match="version: no model version named 'nope'"):
        call_command("export_serving", "nope", output=str(tmp_path / "x"))


def test_installed_keys_are_exactly_the_listed_ones(db, django_user_model):
    owner = django_user_model.objects.create(username="full-service")
    _, first = key_create(name="a", owner=owner)
    _, second = key_create(name="b", owner=owner)
    ApiKey.objects.all().delete()  # made on the full service; this registry starts empty

    assert keys_install(raws=[first, second], name="serving") == 2
    assert keys_install(raws=[second], name="serving") == 1
    usable = ApiKey.objects.filter(revoked_at__isnull=True).values_list("prefix", flat=True)
    assert list(usable) == [second[:11]]
    serving_user = django_user_model.objects.get(username="serving")
    assert not serving_user.has_usable_password()
    with pytest.raises(ApiKeyError, match="key 2 is not a full genapi key") as refused:
        keys_install(raws=[second, "sk-secret-value"], name="serving")
    assert "sk-secret-value" not in str(refused.value)
