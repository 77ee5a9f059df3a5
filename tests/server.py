"""Run a second web process (gunicorn) against the test database, model store and cache."""

import os
import socket
import subprocess
import sys
import urllib.request
from contextlib import contextmanager

from django.conf import settings

from tests.worker import REPO, database_url, process_stop, wait_for


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _up(url):
    try:
        with urllib.request.urlopen(url + "/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def web_process(log_path, *, config=False, **settings_env):
    """A gunicorn process serving the app; yields its base URL. Keyword arguments become
    environment variables (settings), e.g. CACHE_URL. ``config``: with the deployment's
    gunicorn settings (docker/gunicorn.conf.py: start-up warm-up, access log)."""
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "genapi.settings.test",
        "DATABASE_URL": database_url(),
        "MODEL_STORE": str(settings.MODEL_STORE),
        "BASE_MODEL_SOURCE": str(settings.BASE_MODEL_SOURCE),
        "BASE_MODEL_NAME": settings.BASE_MODEL_NAME,
        "INFERENCE_TORCH_THREADS": "1",
        **settings_env,
    }
    command = [sys.executable, "-m", "gunicorn", "genapi.wsgi:application", "-b", f"127.0.0.1:{port}",
               "-w", "1", "--threads", "4", "--worker-class", "gthread"]  # fmt: skip
    if config:
        command[3:3] = ["-c", str(REPO / "docker" / "gunicorn.conf.py")]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if not wait_for(lambda: _up(url) or process.poll() is not None, timeout=60) or process.poll() is not None:
                raise RuntimeError(f"the web process did not start: {log_path.read_text()[-2000:]}")
            yield url
        finally:
            process_stop(process)
