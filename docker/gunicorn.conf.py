"""gunicorn settings for the web workers: `gunicorn -c docker/gunicorn.conf.py genapi.wsgi:application`.

Each worker process loads the active model version once and runs one serving
engine, which batches the requests of all its threads. So: few processes, many
threads. Threads mostly wait for the engine; what uses the CPU is the engine's
torch threads, and their number over all processes should not exceed the cores
(torch threads on busy cores slow every step down many times over).

Environment (all optional):
  WEB_CONCURRENCY   worker processes (default 1; add one per extra ~2 cores when
                    one process's batch is full, or use more machines)
  GUNICORN_THREADS  threads per process (default: batch + queue + 8, so that
                    every request the engine may hold has a thread and health
                    checks still get one)
  INFERENCE_TORCH_THREADS  torch threads per process (default: cores / processes)
  PROMETHEUS_MULTIPROC_DIR where every process writes its metrics, for /metrics to add up
                    (default: a new temporary directory per gunicorn; emptied at start)
"""

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from gunicorn import glogging

_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
_batch = int(os.environ.get("INFERENCE_MAX_BATCH", "8"))
_queue = int(os.environ.get("GENERATE_QUEUE_SIZE", "32"))
threads = int(os.environ.get("GUNICORN_THREADS", str(_batch + _queue + 8)))
worker_class = "gthread"
# Read by Django's settings in each worker (workers import the app after the fork).
os.environ.setdefault("INFERENCE_TORCH_THREADS", str(max(1, _cores // workers)))
# torch's OpenMP threads sleep between parallel regions instead of spinning on the cores the
# engine's native kernels use (inference/loader.py, _openmp_passive, says what it measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
# A streamed answer or a queued request may take up to GENERATE_TIMEOUT_SECONDS; a gthread worker
# keeps beating its heartbeat meanwhile, so this only catches a worker that hangs.
timeout = 120
graceful_timeout = 60  # on restart, requests in flight finish first
keepalive = 5
accesslog = "-"
# gunicorn's default line, and the request id the app answered with (X-Request-ID): the key to the
# app's own log lines of that request.
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %({x-request-id}o)s'

# Metrics: any worker may answer a scrape, so every worker writes its counters to files in one
# directory that the scrape adds up (prometheus-client's multiprocess mode). Set here, before the
# master imports the app (on_starting) and so before any worker does: prometheus-client chooses
# its mode at import.
# Made here, it goes at exit; the mark survives gunicorn reading this file again on a reload.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="genapi-metrics-")
    os.environ["GENAPI_METRICS_DIR_MADE"] = "1"


def on_starting(server):
    """Empty the metrics directory: files left by a previous run would add its counts to ours
    (and its processes' gauges would never go). Then say at start what would otherwise show only
    when the first model loads: gunicorn runs no system checks."""
    metrics = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if metrics.is_dir():
        for entry in metrics.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    metrics.mkdir(parents=True, exist_ok=True)

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genapi.settings.production")  # as genapi/wsgi.py
    django.setup()
    from inference import native

    problem = native.problem()
    if problem:
        server.log.warning("%s", problem)

    from django.conf import settings

    if settings.SERVING_ONLY:
        # The serving image: the keys that may call it come from the environment (SERVING_API_KEYS),
        # registered in its own registry before any worker answers; a bad list stops the start.
        from inference.services.keys import ApiKeyError, keys_install

        try:
            count = keys_install(raws=settings.SERVING_API_KEYS, name="serving")
        except ApiKeyError as exc:
            server.log.error("SERVING_API_KEYS: %s", exc.message)
            sys.exit(1)
        server.log.info("Serving: %d API key(s) from SERVING_API_KEYS may call this server", count)


def post_worker_init(worker):
    """Load the active version in the background as the worker starts: the first client does
    not wait for the weights, /api/health answers meanwhile (/api/ready says "loading"), a
    bad artifact shows in the log at start, and a worker whose database is down still
    starts (it loads the version once the database is back)."""
    from inference.services.generation import active_version_warm_start

    active_version_warm_start()


def child_exit(server, worker):
    """A worker that exits (restarted, killed) stops counting in the "live" gauges: engine queue
    depth and running sequences. Its counters stay: a counter never goes back."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if os.environ.get("GENAPI_METRICS_DIR_MADE"):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


# Anything but printable ASCII, the quote and the backslash.
_UNSAFE = re.compile(r"[^ !#-\[\]-~]")


def _escaped(value):
    """A client-controlled string as one printable line: quotes, backslashes, control and
    non-ASCII characters as \\xNN (as nginx writes them), so a crafted user name, path or
    header can neither forge log lines nor send escape sequences to a terminal. A regular
    expression, not a loop over characters: it runs on every field of every request."""
    return _UNSAFE.sub(lambda unsafe: "".join(f"\\x{byte:02x}" for byte in unsafe[0].encode()), value)


class EscapingLogger(glogging.Logger):
    """gunicorn's logger, with every text field of the access log escaped (gunicorn writes the
    Basic user name, the request line, the referrer and the user agent as they came)."""

    def atoms(self, resp, req, environ, request_time):
        return {
            name: _escaped(value) if isinstance(value, str) else value
            for name, value in super().atoms(resp, req, environ, request_time).items()
        }


logger_class = EscapingLogger
