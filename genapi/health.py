"""Whether the deployment's moving parts answer, as /api/ready reports them beside its own
database and model: the task broker, the workers' heartbeats and the model store. Service-wide,
like the Celery app next door (genapi/celery.py starts the heartbeats): the web process reads
what the workers of either app write."""

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from django.conf import settings
from django.core.cache import cache

from finetuning import objectstore
from finetuning.models import Evaluation, FineTuningJob
from finetuning.services.workers import work_queue, worker_name

logger = logging.getLogger(__name__)


def deployment_checks():
    """{name: "ok..." or why not} for the parts of the deployment a web process needs besides
    its database and model: the broker, a training and an evaluation worker, and the model
    store (written to). The serving image has no broker and no workers, and its versions are
    baked in: only the model store, read."""
    if getattr(settings, "SERVING_ONLY", False):
        return {"model_store": model_store_check(write=False)}
    return {
        "broker": broker_check(timeout=settings.READY_BROKER_TIMEOUT_SECONDS),
        "training_worker": worker_check(FineTuningJob),
        "evaluation_worker": worker_check(Evaluation),
        "model_store": model_store_check(),
    }


# --- Workers' heartbeats ----------------------------------------------------------------
# A worker's main process stamps "seen now" for each queue it consumes, from a thread of its own
# (started when the worker is ready, see genapi/celery.py), idle or busy. The web's readiness
# probe reads the stamps: no broadcast to the workers, no waiting for their answers. The stamps go
# to the cache when it is shared (CACHE_URL: Redis), else to a file under GENAPI_VAR_DIR, which
# the web and the workers share when they run on one machine, as `make run` runs them.


def _cache_shared():
    backend = settings.CACHES["default"]["BACKEND"]
    return not backend.endswith(("LocMemCache", "DummyCache"))


def _seen_key(queue):
    return f"genapi:worker-seen:{queue}"


def _seen_file(queue):
    return Path(settings.VAR_DIR) / "celery" / "workers" / f"{queue}.json"


def worker_seen_record(queues):
    """Stamp the queues this worker consumes as seen now."""
    stamp = {"at": time.time(), "worker": worker_name()}
    for queue in queues:
        if _cache_shared():
            cache.set(_seen_key(queue), stamp, timeout=max(600, settings.WORKER_SEEN_WITHIN_SECONDS * 10))
            continue
        path = _seen_file(queue)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: a probe never reads half a stamp.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".seen-", delete=False) as out:
            json.dump(stamp, out)
        os.chmod(out.name, 0o644)  # the web process may run as another user
        os.replace(out.name, path)


def worker_seen_get(queue):
    """{"at": epoch seconds, "worker": name} of the last stamp for ``queue``, or None."""
    if _cache_shared():
        return cache.get(_seen_key(queue))
    try:
        return json.loads(_seen_file(queue).read_text())
    except (OSError, ValueError):
        return None


def worker_heartbeat_start(queues):
    """Stamp ``queues`` now, then every WORKER_HEARTBEAT_SECONDS from a thread, for as long as the
    process lives or until the returned event is set. A stamp that fails (the cache restarting)
    is tried again at the next beat."""
    queues = sorted(queues)
    stop = threading.Event()

    def stamp():
        try:
            worker_seen_record(queues)
        except Exception:
            logger.exception("Could not record this worker's heartbeat for %s", ", ".join(queues))

    def beat():
        while not stop.wait(settings.WORKER_HEARTBEAT_SECONDS):
            stamp()

    stamp()
    threading.Thread(target=beat, name="genapi-worker-seen", daemon=True).start()
    return stop


def worker_check(model):
    """Says "ok: ..." when a worker of the queue ``model``'s work goes to stamped its heartbeat within
    WORKER_SEEN_WITHIN_SECONDS, else why not."""
    queue = work_queue(model)
    try:
        seen = worker_seen_get(queue)
    except Exception:  # the cache is down: say so, never fail the probe with a 500
        logger.exception("Readiness: the workers' heartbeats could not be read")
        return f"unknown: the {queue} workers' heartbeats could not be read (the log says why)"
    if not seen:
        return f"no {queue} worker has been seen"
    age = time.time() - seen["at"]
    if age > settings.WORKER_SEEN_WITHIN_SECONDS:
        return f"no {queue} worker seen for {age:.0f} s (last: {seen['worker']})"
    return f"ok: {seen['worker']}, {max(age, 0):.0f} s ago"


# --- The model store ----------------------------------------------------------------------


def model_store_check(*, write=True):
    """Says "ok" when this process can list MODEL_STORE and (``write``) write a file there and remove
    it, and the bucket (MODEL_STORE_URL) answers, else why not: a version that is not loaded yet
    could not be loaded, nor a job's data snapshot written."""
    root = Path(settings.MODEL_STORE)
    if not root.is_dir():
        return "the model store's directory does not exist"
    try:
        next(os.scandir(root), None)
        if write:
            with tempfile.NamedTemporaryFile(dir=root, prefix=".ready-"):
                pass
    except OSError as exc:
        logger.error("Readiness: the model store %s cannot be used: %s", root, exc)
        return "the model store's directory cannot be read or written (the log says why)"
    remote = objectstore.bucket()
    if remote is not None:
        return remote.reachable(timeout=settings.READY_BROKER_TIMEOUT_SECONDS)
    return "ok"


# --- The task broker --------------------------------------------------------------------------


def broker_check(*, timeout):
    """Says "ok" when the task broker accepts a connection within ``timeout`` seconds, else why not
    (the driver's words, which name hosts and ports, go to the log only). The filesystem broker
    of `make run` is a folder: it must be there and writable."""
    url = settings.CELERY_BROKER_URL
    if url.startswith("filesystem://"):
        folder = Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])
        if folder.is_dir() and os.access(folder, os.R_OK | os.W_OK | os.X_OK):
            return "ok"
        return "the filesystem broker's folder is missing or not writable"
    if url.startswith("memory://"):
        return "ok"
    from celery import current_app

    # A connection of its own with socket timeouts (see task_publish): a broker that accepts and
    # never answers must not hold the probe.
    broker = current_app.connection_for_write(
        url,
        connect_timeout=timeout,
        transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout, "max_retries": 0},
    )
    try:
        with broker:
            broker.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    except Exception:
        logger.exception("Readiness: the task broker is unreachable")
        return "unreachable (the log says why)"
    return "ok"
