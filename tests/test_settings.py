import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _settings(module, **env):
    code = (
        f"import json, importlib; s = importlib.import_module('genapi.settings.{module}'); "
        "print(json.dumps([s.DEBUG, s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL, str(s.MODEL_STORE)]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True
    )


def test_production_refuses_to_start_without_a_secret_key():
    result = _settings("production")
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_defaults_need_no_server_and_urls_switch_to_postgres_and_redis(tmp_path):
    import json

    default = _settings("production", SECRET_KEY="x", GENAPI_VAR_DIR=str(tmp_path))
    assert json.loads(default.stdout) == [
        False, "django.db.backends.sqlite3", "filesystem://", str(tmp_path / "models"),
    ]  # fmt: skip
    servers = _settings(
        "dev",
        GENAPI_VAR_DIR=str(tmp_path),
        DATABASE_URL="postgres://u@db:5432/genapi",
        CELERY_BROKER_URL="redis://cache:6379/0",
        MODEL_STORE="/srv/models",
    )
    assert json.loads(servers.stdout) == [True, "django.db.backends.postgresql", "redis://cache:6379/0", "/srv/models"]


def test_a_promotion_gate_on_an_unknown_metric_stops_the_service_at_start(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "GENAPI_VAR_DIR": str(tmp_path),
        "PROMOTION_GUARD_METRICS": "attribute_coverage,rouge",
    }
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "PROMOTION_GUARD_METRICS: 'rouge' is not a metric" in result.stderr
    fine = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO, env={**env, "PROMOTION_GUARD_METRICS": "chrf"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert fine.returncode == 0, fine.stderr


def _compose_environment():
    """The web service's environment as docker/compose.yml sets it with no variables given
    (``${NAME:-default}`` takes the default), SECRET_KEY aside, which compose requires."""
    import re

    import yaml

    compose = yaml.safe_load((REPO / "docker" / "compose.yml").read_text())
    environment = compose["services"]["web"]["environment"]
    values = {}
    for name, value in environment.items():
        value = str(value)
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
        # ${NAME:?message}: compose refuses to start without it; any value does here.
        values[name] = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "given-by-the-operator", value)
    values["SECRET_KEY"] = "k" * 10 + "".join(chr(97 + (i * 7) % 26) for i in range(60))  # long and varied
    return values


def test_check_deploy_is_clean_with_the_compose_defaults(tmp_path, settings):
    env = {
        "PATH": "/usr/bin:/bin",
        "GENAPI_VAR_DIR": str(tmp_path),
        # Built by the image as by `make`: here, this checkout's build.
        "INFERENCE_NATIVE_DIR": str(settings.INFERENCE_NATIVE_DIR),
        "DJANGO_SETTINGS_MODULE": "genapi.settings.production",
        **_compose_environment(),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_the_default_length_never_exceeds_the_cap(tmp_path):
    code = "from django.conf import settings as s; print(s.GENERATE_MAX_NEW_TOKENS, s.GENERATE_DEFAULT_MAX_NEW_TOKENS)"
    env = {"PATH": "/usr/bin:/bin", "GENAPI_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "genapi.settings.dev"}
    capped = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=REPO,
        env={**env, "GENERATE_MAX_NEW_TOKENS": "16"},
        capture_output=True,
        text=True,
    )
    assert capped.stdout.split() == ["16", "16"], capped.stderr
    over = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env={**env, "GENERATE_MAX_NEW_TOKENS": "16", "GENERATE_DEFAULT_MAX_NEW_TOKENS": "100"},
        capture_output=True,
        text=True,
    )
    assert over.returncode != 0
    assert "GENERATE_DEFAULT_MAX_NEW_TOKENS (100) is larger than GENERATE_MAX_NEW_TOKENS (16)" in over.stderr


def _check(env, **overrides):
    """``manage.py check`` with these settings in the environment."""
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO, env={**env, **overrides}, capture_output=True, text=True
    )


def test_the_service_writes_no_repeated_4_token_run_by_default_and_refuses_a_negative_size(tmp_path):
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "from inference.engine.params import GenerationParams; from finetuning.scoring import Decoding; "
        "print(s.GENERATE_NO_REPEAT_NGRAM_SIZE, GenerationParams().no_repeat_ngram_size, "
        "Decoding.from_settings().no_repeat_ngram_size)"
    )
    env = {"PATH": "/usr/bin:/bin", "GENAPI_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "genapi.settings.dev"}
    served = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert served.stdout.split() == ["4", "4", "4"], served.stderr  # requests and evaluations alike
    negative = _check(env, GENERATE_NO_REPEAT_NGRAM_SIZE="-1")
    assert negative.returncode != 0
    assert "GENERATE_NO_REPEAT_NGRAM_SIZE (-1) must be 0 (no repeated n-gram rule) or more" in negative.stderr


def test_the_length_floor_is_off_by_default_and_a_floor_past_the_default_length_stops_check(tmp_path):
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "from inference.engine.params import GenerationParams; from finetuning.scoring import Decoding; "
        "print(s.GENERATE_MIN_NEW_TOKENS, GenerationParams().min_new_tokens, Decoding.from_settings().min_new_tokens)"
    )
    env = {"PATH": "/usr/bin:/bin", "GENAPI_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "genapi.settings.dev"}
    served = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert served.stdout.split() == ["0", "0", "0"], served.stderr
    for value in ("-1", "500"):
        refused = _check(env, GENERATE_MIN_NEW_TOKENS=value)
        assert refused.returncode != 0
        assert (
            f"GENERATE_MIN_NEW_TOKENS ({value}) must be 0 (no length floor) up to the default length" in refused.stderr
        )
