"""What the service tells its operator: Prometheus metrics, request ids in every log line, and
the log formats.

Imported by the engine's scheduler thread and by the logging configuration (before the apps
are ready): nothing from Django at import time, nothing that touches the database.

Metrics live in prometheus-client's default registry. Under gunicorn (several processes),
PROMETHEUS_MULTIPROC_DIR is set before any worker imports prometheus-client (see
docker/gunicorn.conf.py): every process then writes its values to files there and a scrape,
answered by any one process, adds them all up. Unset (runserver, the tests), values stay in
the process that made them.
"""

import contextlib
import json
import logging
import os
import re
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

# --- Request ids --------------------------------------------------------------------

_request_id = ContextVar("genapi_request_id", default=None)
# A client's (or the proxy's) id is kept when it is short and made of characters that can break
# neither a header, a JSON log line nor a plain one: UUIDs, nginx's $request_id, AWS trace ids,
# base64. Anything else is replaced by an id of ours, so that a client cannot forge log lines.
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:+/=-]{1,64}")


def request_id_accept(value):
    """The id to use for a request that sent ``value`` in X-Request-ID (None: it sent none)."""
    if value and _REQUEST_ID_PATTERN.fullmatch(value):
        return value
    return uuid.uuid4().hex


def request_id_get():
    """The id of the request this thread is serving now (None outside a request)."""
    return _request_id.get()


@contextlib.contextmanager
def request_id_bound(request_id):
    """Log lines inside the block carry ``request_id``: a web thread while it serves a request,
    the engine's scheduler thread while it logs about one request's sequences (context variables
    do not cross into that thread by themselves)."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


# --- Log formats ----------------------------------------------------------------------


def _record_request_id(record):
    # Django logs a 4xx or 5xx answer ("Not Found: /path") once the middleware has returned, with
    # the request in `extra`: the id is read from there.
    return (
        getattr(record, "request_id", None)
        or _request_id.get()
        or getattr(getattr(record, "request", None), "request_id", None)
    )


class RequestIdFilter(logging.Filter):
    """Stamps ``record.request_id`` as a handler receives the record, in the thread that logged it:
    a formatter that runs later (a queue handler's) still writes the right id."""

    def filter(self, record):
        record.request_id = _record_request_id(record)
        return True


class PlainFormatter(logging.Formatter):
    """For people reading a terminal (`make run`): one line, the request id in brackets."""

    def __init__(self, fmt="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s", **kwargs):
        super().__init__(fmt, **kwargs)

    def format(self, record):
        request_id = _record_request_id(record)
        record.request_id = request_id or "-"
        try:
            return super().format(record)
        finally:
            record.request_id = request_id


# The attributes every LogRecord has: anything else came in `extra=` and is written as a field.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """For log collectors (production): one JSON object per line, with the request id, the
    exception's traceback as one field, and what a call passed in ``extra``."""

    def format(self, record):
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = _record_request_id(record)
        if request_id:
            entry["request_id"] = request_id
        entry["process"] = record.process
        entry["thread"] = record.threadName
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for name, value in record.__dict__.items():
            # Data only: an object passed along (Django's `request`) would be written as its repr,
            # which may carry a query string.
            if name in _RECORD_ATTRIBUTES or name == "request_id" or name.startswith("_"):
                continue
            if isinstance(value, str | int | float | bool | list | dict | type(None)):
                entry.setdefault(name, value)
        return json.dumps(entry, ensure_ascii=False, default=str)


# --- Metrics: the web processes -------------------------------------------------------

# Latency of whole answers (a stream's until its end): from a health check to a minute-long stream.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Methods a client may send are unbounded: anything else is counted as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    "genapi_http_requests",
    "HTTP requests answered, by URL pattern (never the raw path), method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "genapi_http_request_duration_seconds",
    "Seconds from a request's arrival to the end of its answer (a stream's last event), by URL pattern.",
    ["route", "method"],
    buckets=_HTTP_BUCKETS,
)
# One value per process and engine; "livesum" adds up the processes alive now (a dead worker's
# last value drops out when gunicorn marks it dead).
ENGINE_QUEUE = Gauge(
    "genapi_engine_queue_depth",
    "Sequences waiting for a place in an engine's batch.",
    ["engine"],
    multiprocess_mode="livesum",
)
ENGINE_RUNNING = Gauge(
    "genapi_engine_running_sequences",
    "Sequences in an engine's batch (prefilling or decoding).",
    ["engine"],
    multiprocess_mode="livesum",
)
TOKENS = Counter(
    "genapi_generated_tokens",
    "Tokens generated, by model: a LoRA version's name, else the weights' engine name "
    "(bounded by the versions ever loaded).",
    ["model"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "genapi_time_to_first_token_seconds",
    "Seconds from a generation's arrival at the engine to its first token: queueing and prefill.",
    buckets=_TTFT_BUCKETS,
)
MODEL_LOADS = Counter(
    "genapi_model_loads", "Model versions loaded into a web process, by outcome (ok or error).", ["outcome"]
)
MODEL_LOAD_DURATION = Histogram(
    "genapi_model_load_duration_seconds",
    "Seconds to load a model version (its weights too when no loaded version shared them).",
    buckets=_LOAD_BUCKETS,
)


def http_observe(*, route, method, status, seconds):
    method = method if method in _METHODS else "other"
    HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
    HTTP_DURATION.labels(route=route, method=method).observe(seconds)


def route_label(request):
    """The URL pattern that answered ``request`` ("api/generate", "admin/.../<path:object_id>/change/"):
    one series per pattern in the code, whatever paths clients send."""
    match = getattr(request, "resolver_match", None)
    if match is not None:
        return match.route or match.view_name or "unnamed"
    from django.conf import settings

    static = "/" + settings.STATIC_URL.lstrip("/")
    return "static" if request.path.startswith(static) else "unmatched"


def engine_load_set(engine, *, running, waiting):
    ENGINE_RUNNING.labels(engine=engine).set(running)
    ENGINE_QUEUE.labels(engine=engine).set(waiting)


def tokens_count(model, tokens):
    if tokens:
        TOKENS.labels(model=model).inc(tokens)


def first_token_observe(seconds):
    TIME_TO_FIRST_TOKEN.observe(seconds)


@contextlib.contextmanager
def model_load_observed():
    """Count a model load and how long it took; one that raises counts as an error."""
    started = time.monotonic()
    try:
        yield
    except BaseException:
        MODEL_LOADS.labels(outcome="error").inc()
        raise
    MODEL_LOADS.labels(outcome="ok").inc()
    MODEL_LOAD_DURATION.observe(time.monotonic() - started)


# --- Metrics: the fine-tuning work, from the database ---------------------------------


class WorkCollector:
    """Jobs and evaluations by state, and the steps of running jobs, read from the database at
    scrape time (the training worker is another process, often another machine): three indexed
    queries per scrape, whatever the number of rows. Every state is always reported (0
    included), so that a graph falls to zero instead of stopping. A database that cannot be
    reached gives genapi_database_up 0 and nothing else, rather than a failed scrape."""

    def collect(self):
        from django.db import DatabaseError

        up = GaugeMetricFamily("genapi_database_up", "Whether the last scrape could read the database (1) or not (0).")
        try:
            families = list(self._families())
        except DatabaseError:
            logger.exception("Metrics: the database could not be read")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self):
        from finetuning.selectors import jobs_running_progress, work_counts

        counts = work_counts()
        for key, name, what in (
            ("jobs", "genapi_jobs", "Fine-tuning jobs"),
            ("evaluations", "genapi_evaluations", "Evaluations"),
        ):
            family = GaugeMetricFamily(name, f"{what} by state, from the database.", labels=["state"])
            for state, rows in counts[key].items():
                family.add_metric([state], rows)
            yield family
        step = GaugeMetricFamily("genapi_job_step", "The step a running job has reached.", labels=["job"])
        total = GaugeMetricFamily("genapi_job_total_steps", "The steps a running job will take.", labels=["job"])
        # One series per running job: a handful at most (one per dataset), gone once it ends.
        for pk, done, steps in jobs_running_progress():
            step.add_metric([str(pk)], done)
            total.add_metric([str(pk)], steps)
        yield step
        yield total


# --- The scrape ---------------------------------------------------------------------------


def multiprocess_dir():
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or ""


def scrape():
    """The exposition text of every metric: this process's (or, under gunicorn, every live
    process's, read from PROMETHEUS_MULTIPROC_DIR) and the jobs and evaluations read from the
    database now. Returns (body bytes, content type)."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        processes = _generate_latest(registry)
    else:
        processes = _generate_latest(REGISTRY)
    database = CollectorRegistry()
    database.register(WorkCollector())
    return processes + _generate_latest(database), CONTENT_TYPE_LATEST
