"""The web process the benchmarks measure: gunicorn with the deployment's config."""

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from train_bench import ROOT


def gunicorn_start(env, log_path, port, *, timeout):
    """Start ``gunicorn -c docker/gunicorn.conf.py`` with ``env`` (GUNICORN_BIND on ``port``)
    and wait until /api/ready answers 200 (the active version loaded); returns (process, log
    file). Exits naming the log when it does not come up within ``timeout`` seconds."""
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or "gunicorn"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [gunicorn, "-c", "docker/gunicorn.conf.py", "genapi.wsgi:application"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/ready", timeout=60).read()
            return process, log
        except OSError:  # not up yet, or 503 while the model loads
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not start; see {log_path}") from None
            time.sleep(0.5)
