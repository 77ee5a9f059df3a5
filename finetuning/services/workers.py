"""What jobs and evaluations share as long-running work in a Celery worker."""

import logging
import os
import socket
import threading
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

logger = logging.getLogger(__name__)


def worker_name():
    return f"{socket.gethostname()} pid {os.getpid()}"


class Heartbeat:
    """A thread that stamps the heartbeat of a running row (a job, an evaluation)
    while the worker is alive, through model loading and scoring as well as
    training steps; the stale check fails rows whose heartbeat stops."""

    def __init__(self, model, pk):
        self.model = model
        self.pk = pk
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{model._meta.model_name}-{pk}", daemon=True)

    def _run(self):
        try:
            while not self.stop.wait(settings.JOB_HEARTBEAT_SECONDS):
                try:
                    self.model.objects.filter(pk=self.pk, status="running").update(heartbeat_at=timezone.now())
                except Exception:  # a database blip: try again at the next beat
                    logger.exception("Heartbeat of %s %s failed", self.model._meta.model_name, self.pk)
                    close_old_connections()
        finally:
            connection.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        # Bounded: a beat stuck on a database lock must not hold the ending up.
        self.thread.join(timeout=5)


def stale_fail(model, *, again):
    """Mark failed every running row of ``model`` (a job, an evaluation) whose worker stopped
    beating (killed, out of memory, machine gone); returns the rows it failed. Each is failed
    by a conditional update on the heartbeat it was read with, so a worker that beats again
    meanwhile keeps its row. ``again`` ends the message: what the curator should do."""
    stale_after = settings.JOB_STALE_AFTER_SECONDS
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    reaped = []
    for row in model.objects.filter(status="running", heartbeat_at__lt=cutoff):
        last = row.heartbeat_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        if model.objects.filter(pk=row.pk, status="running", heartbeat_at=row.heartbeat_at).update(
            status="failed",
            finished_at=timezone.now(),
            error=(
                f"worker lost: no heartbeat from {row.worker or 'its worker'} since {last} "
                f"(more than {stale_after} s); the process was killed or lost its connection. {again}"
            ),
        ):
            logger.warning("%s %s failed: worker lost (last heartbeat %s)", model.__name__, row.pk, last)
            reaped.append(row)
    return reaped
