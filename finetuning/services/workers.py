"""What jobs and evaluations share as long-running work in a Celery worker: sending
the task, the heartbeat, and the checks that leave no row queued or running for good."""

import logging
import os
import socket
import threading
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)

# Seconds past the soft time limit at which Celery kills a task that ignores it.
HARD_LIMIT_GRACE_SECONDS = 300


class BrokerUnavailable(Exception):
    """The task broker could not be reached in time to send a task."""


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


def task_publish(task, *, pk, time_limit):
    """Send ``task(pk)`` to the broker with its time limits, or raise BrokerUnavailable
    within about JOB_PUBLISH_TIMEOUT_SECONDS (a broker that refuses: under a second).
    The soft limit raises inside the task (the row ends failed, files cleaned up); the
    hard one kills a task that ignores it."""
    timeout = settings.JOB_PUBLISH_TIMEOUT_SECONDS
    # A connection of its own with socket timeouts: the pooled one keeps none (a broker that
    # accepts and never answers would hold the caller for good), and the worker's consuming
    # connection should not get them.
    broker = task.app.connection_for_write(
        connect_timeout=timeout,
        transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout, "max_retries": 1},
    )
    try:
        with broker:
            task.apply_async(
                args=[pk],
                soft_time_limit=time_limit,
                time_limit=time_limit + HARD_LIMIT_GRACE_SECONDS,
                connection=broker,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 0.2},
            )
    except (OperationalError, *broker.connection_errors) as exc:
        # Hosts, ports and the driver's words go to the log only.
        logger.error("Could not send %s(%s) to the task broker: %s", task.name, pk, exc)
        raise BrokerUnavailable("the task broker is not reachable") from exc


def not_queued_fail(model, pk, *, again):
    """Fail a queued row whose task could not be sent, so that it blocks nothing. False
    when the row is no longer queued: the task reached the broker after all and a worker
    claimed it."""
    return bool(
        model.objects.filter(pk=pk, status="queued").update(
            status="failed",
            finished_at=timezone.now(),
            error=f"not queued: the task broker could not be reached when it was started. {again}",
        )
    )


def _training_busy(since):
    """Whether a training worker has run anything since ``since``: a job or evaluation
    running now, or one that started or finished since then."""
    from finetuning.models import Evaluation, FineTuningJob

    worked = Q(status="running") | Q(started_at__gte=since) | Q(started_at__isnull=False, finished_at__gte=since)
    return FineTuningJob.objects.filter(worked).exists() or Evaluation.objects.filter(worked).exists()


def queued_recheck(model, task, *, again, worker_start=False):
    """Send again the task of every row of ``model`` still queued JOB_QUEUED_RECHECK_SECONDS
    after it was sent: the broker may have lost it (Redis restarted without its data), and a
    duplicate is harmless (one claim wins). Fail rows queued longer than
    JOB_QUEUED_TIMEOUT_SECONDS while no training worker ran anything: no worker takes work.
    Waiting in line behind other work never fails a row. When a worker starts, every queued
    row is sent again and none failed: a worker is here now. Returns (ids sent again, rows failed)."""
    now = timezone.now()
    failed = [] if worker_start else _queued_too_long_fail(model, again=again, now=now)
    resend_after = 0 if worker_start else settings.JOB_QUEUED_RECHECK_SECONDS
    resent = []
    for row in model.objects.filter(status="queued", enqueued_at__lte=now - timedelta(seconds=resend_after)):
        # Taken by a conditional update first, so that two checks at once send it once.
        if not model.objects.filter(pk=row.pk, status="queued", enqueued_at=row.enqueued_at).update(
            enqueued_at=timezone.now(), requeue_count=F("requeue_count") + 1
        ):
            continue
        try:
            task_publish(task, pk=row.pk, time_limit=row.time_limit_seconds)
        except BrokerUnavailable:
            break  # the others would wait for the broker too: the next check tries again
        logger.warning("%s %s is still queued: its task is sent again", model.__name__, row.pk)
        resent.append(row.pk)
    return resent, failed


def _queued_too_long_fail(model, *, again, now):
    timeout = settings.JOB_QUEUED_TIMEOUT_SECONDS
    since = now - timedelta(seconds=timeout)
    waited = model.objects.filter(status="queued", created_at__lt=since)
    if not waited.exists() or _training_busy(since=since):
        return []
    failed = []
    for row in waited:
        sent = 1 + row.requeue_count
        if model.objects.filter(pk=row.pk, status="queued").update(
            status="failed",
            finished_at=timezone.now(),
            error=(
                f"never picked up: queued for more than {timeout} s (its task sent {sent} "
                f"time{'s' if sent > 1 else ''}) while no training worker ran anything; check that a "
                f"worker consumes the training queue. {again}"
            ),
        ):
            logger.warning(
                "%s %s failed: queued for more than %s s and no worker took it", model.__name__, row.pk, timeout
            )
            failed.append(row)
    return failed
