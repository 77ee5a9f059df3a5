"""What jobs and evaluations share as long-running work in a Celery worker."""

import logging
import os
import socket
import threading

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
