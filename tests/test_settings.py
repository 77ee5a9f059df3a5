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
