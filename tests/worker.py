"""Run a real Celery worker process against the test database and model store."""

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import connection

REPO = Path(__file__).resolve().parent.parent


def database_url():
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{user}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextmanager
def celery_worker(log_path, queues="training", **settings_env):
    """A worker process consuming ``queues`` (comma-separated: "training" takes jobs,
    "evaluation" evaluations, as `make run` starts one worker for each); keyword
    arguments become environment variables (settings), e.g. JOB_STALE_AFTER_SECONDS="2"."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "genapi.settings.test",
        "DATABASE_URL": database_url(),
        "MODEL_STORE": str(settings.MODEL_STORE),
        "BASE_MODEL_SOURCE": str(settings.BASE_MODEL_SOURCE),
        "BASE_MODEL_NAME": settings.BASE_MODEL_NAME,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "TRAINING_TORCH_THREADS": "1",
        "JOB_PROGRESS_SECONDS": "0.2",
        **settings_env,
    }
    command = [
        sys.executable, "-m", "celery", "-A", "genapi", "worker", "-Q", queues, "--pool=solo",
        "--without-gossip", "--without-mingle", "-n", f"test-{uuid.uuid4().hex[:8]}@%h", "-l", "info",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process_stop(process)


def wait_for(predicate, timeout, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def process_stop(process):
    """Stop a process the tests started: politely, then not."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
