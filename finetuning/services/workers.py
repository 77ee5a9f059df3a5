"""The skeleton of long-running work in a Celery worker, shared by fine-tuning jobs and
evaluations (finetuning.models.LongRunningWork): the time limit, sending the task, the claim,
cancelling, the heartbeat, progress and time left, the queue position, and the checks that
leave no row queued or running for good. services/jobs.py and services/evaluations.py keep
only what is their own: what a job trains, what an evaluation scores."""

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError

from finetuning.models import Evaluation, FineTuningJob

logger = logging.getLogger(__name__)

# Seconds past the soft time limit at which Celery kills a task that ignores it.
HARD_LIMIT_GRACE_SECONDS = 300
# How often running work looks for a cancel request.
CANCEL_CHECK_SECONDS = 0.5
# Below this many seconds left, the time left reads "finishing…": an estimate of a few
# seconds is noise, and "about 0 min 00 s" for a minute is worse than no number.
FINISHING_SECONDS = 10
# The task each kind of work runs as; its queue is the task's route (CELERY_TASK_ROUTES).
WORK_TASKS = {FineTuningJob: "finetuning.tasks.job_run", Evaluation: "finetuning.tasks.evaluation_run"}


class BrokerUnavailable(Exception):
    """The task broker could not be reached in time to send a task."""


def worker_name():
    return f"{socket.gethostname()} pid {os.getpid()}"


def work_time_limit(*, tokens):
    """Seconds a task may run before Celery stops it: a fixed allowance for loading and
    saving plus a generous budget per token it will process (about 15x what a CPU needs),
    so that long work is never killed by a default and hung work is."""
    return int(settings.JOB_TIME_LIMIT_BASE_SECONDS + tokens * settings.JOB_TIME_LIMIT_SECONDS_PER_TOKEN)


def work_claim(model, pk, *, message_time_limit=None):
    """Take a queued row for this worker: queued -> running by a conditional update, so that
    two workers, or a task delivered twice, run it once. ``message_time_limit``: the soft
    limit the delivered task carries; a message sent before the row was resized to a larger
    limit is left alone (the task sent with the resize claims it)."""
    rows = model.objects.filter(pk=pk, status="queued")
    if message_time_limit is not None:
        rows = rows.filter(time_limit_seconds__lte=message_time_limit)
    now = timezone.now()
    return bool(rows.update(status="running", started_at=now, heartbeat_at=now, worker=worker_name()))


def work_cancel(model, pk, *, before_start):
    """Cancel a queued row at once (True), or ask a running one to stop at its next step
    (False; the worker ends it cancelled). ``before_start``: the row's error when it never ran."""
    now = timezone.now()
    if model.objects.filter(pk=pk, status="queued").update(
        status="cancelled", cancel_requested_at=now, finished_at=now, error=before_start
    ):
        return True
    model.objects.filter(pk=pk, status="running", cancel_requested_at__isnull=True).update(cancel_requested_at=now)
    return False


class CancelCheck:
    """Whether a cancel was requested for a running row, read at most every CANCEL_CHECK_SECONDS."""

    def __init__(self, model, pk):
        self.model = model
        self.pk = pk
        self.last_check = 0.0

    def __call__(self):
        now = time.monotonic()
        if now - self.last_check < CANCEL_CHECK_SECONDS:
            return False
        self.last_check = now
        return self.model.objects.filter(pk=self.pk, cancel_requested_at__isnull=False).exists()


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


def work_publish(model, task, *, pk, time_limit, again):
    """Send the task of a queued row. When the broker cannot be reached, the row is failed
    (so that it blocks nothing) and BrokerUnavailable raised; when the row was taken by a
    worker meanwhile (the task got through after all), nothing is raised."""
    try:
        task_publish(task, pk=pk, time_limit=time_limit)
    except BrokerUnavailable:
        if not_queued_fail(model, pk, again=again):
            raise


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


# --- Queues: which worker takes what -----------------------------------------------


def work_queue(model):
    """The Celery queue the task of ``model``'s rows goes to (CELERY_TASK_ROUTES)."""
    route = settings.CELERY_TASK_ROUTES.get(WORK_TASKS[model], {})
    return route.get("queue", getattr(settings, "CELERY_TASK_DEFAULT_QUEUE", "celery"))


def _queue_peers(model):
    """The kinds of work that wait in the same queue as ``model``'s (one worker takes them in turn)."""
    queue = work_queue(model)
    return [other for other in WORK_TASKS if work_queue(other) == queue]


def _queue_busy(model, since):
    """Whether a worker of ``model``'s queue has run anything since ``since``: a row running
    now, or one that started or finished since then."""
    worked = Q(status="running") | Q(started_at__gte=since) | Q(started_at__isnull=False, finished_at__gte=since)
    return any(peer.objects.filter(worked).exists() for peer in _queue_peers(model))


def queued_recheck(model, task, *, again, worker_start=False):
    """Send again the task of every row of ``model`` still queued JOB_QUEUED_RECHECK_SECONDS
    after it was sent: the broker may have lost it (Redis restarted without its data), and a
    duplicate is harmless (one claim wins). Fail rows queued longer than
    JOB_QUEUED_TIMEOUT_SECONDS while no worker of their queue ran anything: no worker takes work.
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
    if not waited.exists() or _queue_busy(model, since=since):
        return []
    queue = work_queue(model)
    failed = []
    for row in waited:
        sent = 1 + row.requeue_count
        if model.objects.filter(pk=row.pk, status="queued").update(
            status="failed",
            finished_at=timezone.now(),
            error=(
                f"never picked up: queued for more than {timeout} s (its task sent {sent} "
                f"time{'s' if sent > 1 else ''}) while no {queue} worker ran anything; check that a "
                f"worker consumes the {queue} queue. {again}"
            ),
        ):
            logger.warning(
                "%s %s failed: queued for more than %s s and no worker took it", model.__name__, row.pk, timeout
            )
            failed.append(row)
    return failed


# --- Progress and time left ---------------------------------------------------------


class TimeLeft:
    """Seconds of work left, from measured step times: the rate over the last ``window``
    steps (None: since the first mark), and before two steps are measured the speed of the
    last comparable run (``prior_seconds_per_step``), if any.

    An estimate never rises by more than a tenth of itself (at least FINISHING_SECONDS) over
    what the previous one predicted for now, so a slow step or a validation pass does not
    throw it back by minutes; it falls as fast as the work goes. A run past its estimate
    reads 0 until it rises again: the display says "finishing…", never "0 min 00 s"."""

    def __init__(self, *, total, prior_seconds_per_step=None, window=32):
        self.total = total
        self.prior = prior_seconds_per_step
        self.marks = deque(maxlen=window + 1 if window else None)
        self.first = None
        self.said = None  # (when, seconds left) of the last estimate

    def observe(self, step, now):
        if self.marks and step <= self.marks[-1][1]:
            return
        if self.first is None:
            self.first = (now, step)
        self.marks.append((now, step))

    def seconds_per_step(self):
        if len(self.marks) >= 2:
            start = self.marks[0] if self.marks.maxlen else self.first
            (then, done_then), (now, done) = start, self.marks[-1]
            if done > done_then and now > then:
                return (now - then) / (done - done_then)
        return self.prior

    def estimate(self, step, now):
        rate = self.seconds_per_step()
        if rate is None:
            return None
        left = max(self.total - step, 0) * rate
        if self.said is not None:
            then, said = self.said
            expected = max(said - (now - then), 0.0)
            left = min(left, expected + max(0.1 * left, FINISHING_SECONDS))
        self.said = (now, left)
        return left


class ProgressMeter:
    """Writes a running row's step, total, share done and time left (with the heartbeat) at
    most every JOB_PROGRESS_SECONDS, and always at the last step; ``extra`` (a callable)
    adds fields of the row's own (a job's loss history) to each write."""

    def __init__(self, model, pk, *, total, prior_seconds_per_step=None, window=32):
        self.model = model
        self.pk = pk
        self.time_left = TimeLeft(total=total, prior_seconds_per_step=prior_seconds_per_step, window=window)
        self.last_write = 0.0

    @property
    def total(self):
        return self.time_left.total

    def start(self, *, count_from_now):
        """The first write, before any step: the total, and the time left at the last comparable
        run's speed until steps are measured. ``count_from_now``: measure the first step from
        here (an evaluation, whose model loading recurs for every version it scores) rather
        than from the first step (a job: loading happens once, before its steps)."""
        now = time.monotonic()
        if count_from_now:
            self.time_left.observe(0, now)
        self.write(0, now)

    def __call__(self, step, *, total=None, force=False, extra=None):
        now = time.monotonic()
        if total is not None:
            self.time_left.total = total
        self.time_left.observe(step, now)
        if not force and step < self.total and now - self.last_write < settings.JOB_PROGRESS_SECONDS:
            return
        self.write(step, now, **(extra() if extra else {}))

    def write(self, step, now, **fields):
        self.last_write = now
        total = self.total
        self.model.objects.filter(pk=self.pk).update(
            step=step,
            total_steps=total,
            progress=min(step / total, 1.0) if total else 0.0,
            eta_seconds=self.time_left.estimate(step, now),
            heartbeat_at=timezone.now(),
            **fields,
        )


def _step_weight(row):
    """What one step of ``row`` weighs, to carry a measured speed over to work of another
    size: token slots per optimiser step for a job, new tokens allowed per example for an
    evaluation."""
    if isinstance(row, FineTuningJob):
        hp = row.hyperparameters or {}
        return hp.get("batch_size", 1) * hp.get("gradient_accumulation_steps", 1) * hp.get("max_seq_length", 1)
    return (row.decoding or {}).get("max_new_tokens") or 1


def _measured_seconds_per_step(row):
    if isinstance(row, FineTuningJob) and row.metrics.get("train_seconds") and row.metrics.get("steps"):
        return row.metrics["train_seconds"] / row.metrics["steps"]  # training steps only, as jobs count
    return row.wall_seconds / row.total_steps


def seconds_per_step_prior(row):
    """Seconds a step of ``row`` should take, from the last comparable run that succeeded
    (same kind of work; for a job the same base model and method, on the same device once
    known), scaled to ``row``'s step size; None when there is none."""
    model = type(row)
    comparable = model.objects.filter(
        status="succeeded", total_steps__gt=0, started_at__isnull=False, finished_at__isnull=False
    ).exclude(pk=row.pk)
    if isinstance(row, FineTuningJob):
        comparable = comparable.filter(
            base_model=row.base_model, hyperparameters__method=(row.hyperparameters or {}).get("method", "lora")
        )
        if row.environment.get("device"):
            comparable = comparable.filter(environment__device=row.environment["device"])
    previous = comparable.order_by("-finished_at").first()
    if previous is None:
        return None
    return _measured_seconds_per_step(previous) * _step_weight(row) / _step_weight(previous)


def duration_words(seconds):
    """As the admin writes durations: "1 min 35 s", "2 h 05 min"."""
    seconds = max(int(math.ceil(seconds)), 1)
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def work_seconds_estimate(row):
    """Seconds a queued row should run once started, at the last comparable run's speed; None when unknown."""
    prior = seconds_per_step_prior(row)
    if prior is None or not row.total_steps:
        return None
    return prior * row.total_steps


def time_left_words(row):
    """The time left of a row as a curator reads it: "about 4 min left", "finishing…"."""
    if row.status == "queued":
        estimate = work_seconds_estimate(row)
        return f"takes about {duration_words(estimate)}" if estimate is not None else "not started"
    if row.status != "running":
        return "–"
    if row.cancel_requested_at:
        return "stopping…"
    if row.total_steps and row.step >= row.total_steps:
        return "finishing…"
    if row.eta_seconds is None:
        return "estimating…"
    if row.eta_seconds < FINISHING_SECONDS:
        return "finishing…"
    return f"about {duration_words(row.eta_seconds)} left"


# --- The queue as curators see it ------------------------------------------------------


def work_label(row):
    return f"{'job' if isinstance(row, FineTuningJob) else 'evaluation'} {row.pk}"


def _ordinal(number):
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def work_ahead(row):
    """The rows a queued ``row`` waits behind in its queue: the running ones first (oldest
    start first), then those queued before it (the broker hands tasks out in the order sent)."""
    running, queued = [], []
    for peer in _queue_peers(type(row)):
        running += peer.objects.filter(status="running")
        queued += peer.objects.filter(status="queued", created_at__lt=row.created_at)
    running.sort(key=lambda other: other.started_at or other.created_at)
    queued.sort(key=lambda other: (other.created_at, other.pk))
    return running + queued


def queue_words(row, *, named=2, wait=True):
    """Where a queued row stands: "2nd in the training queue, behind job 12 (running, about
    4 min left); starts in about 4 min" (``wait``: with that last part, when it is known).
    Empty when the row is not queued."""
    if row.status != "queued":
        return ""
    ahead = work_ahead(row)
    queue = work_queue(type(row))
    if not ahead:
        return f"next in the {queue} queue, nothing ahead of it"
    waits, parts = [], []
    for other in ahead:
        if other.status == "running":
            waits.append(None if other.eta_seconds is None else other.eta_seconds)
            parts.append(f"{work_label(other)} (running, {time_left_words(other)})")
        else:
            waits.append(work_seconds_estimate(other))
            parts.append(f"{work_label(other)} (queued)")
    behind = ", ".join(parts[:named])
    if len(parts) > named:
        behind += f" and {len(parts) - named} more"
    text = f"{_ordinal(len(ahead) + 1)} in the {queue} queue, behind {behind}"
    if wait and all(seconds is not None for seconds in waits):
        text += f"; starts in about {duration_words(sum(waits))}"
    return text


def work_active():
    """Running and queued jobs and evaluations, each with ``kind``, ``label``,
    ``time_left`` and ``queue`` (words, see queue_words): running first, then queued
    in the order they will run."""
    rows = [
        *FineTuningJob.objects.filter(status__in=FineTuningJob.ACTIVE).select_related("dataset"),
        *Evaluation.objects.filter(status__in=Evaluation.ACTIVE).select_related("version"),
    ]
    for row in rows:
        row.kind = "job" if isinstance(row, FineTuningJob) else "evaluation"
        row.label = work_label(row)
        row.time_left = time_left_words(row)
        row.queue = queue_words(row)
    running = sorted((r for r in rows if r.status == "running"), key=lambda r: r.started_at or r.created_at)
    queued = sorted((r for r in rows if r.status == "queued"), key=lambda r: (r.created_at, r.pk))
    return running + queued
