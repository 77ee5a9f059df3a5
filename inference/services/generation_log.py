"""The generation log: every generation as its caller met it (inference.models.Generation).

Recording is best-effort by design: a generation that was answered must never fail, or wait,
because its record could not be written. So every write here catches its error, logs it and
returns nothing, and the API routes write only once the client has its answer (a plain
request when its response is closed, a stream when it ends). Rows are kept
GENERATION_LOG_RETENTION_DAYS days (0: nothing is recorded); ``generations_purge`` deletes
older ones, except those a curator rated or turned into a training example.
"""

import dataclasses
import datetime
import json
import logging
import threading
import time

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from inference.models import Generation

logger = logging.getLogger(__name__)

# Rows deleted per statement by the purge: short statements, no long lock on a busy table.
PURGE_BATCH_SIZE = 1000


# Writes promised to clients that already have their answer (a response closed after its body,
# a stream past its last chunk), counted from before the client can see the end: whoever must
# know that the log is written (a test about to empty the database) waits for none to remain.
_pending = 0
_settled = threading.Condition()


def generations_pending():
    """Note a write to come; returns the function that makes it (``write(records)``, once)."""
    global _pending
    with _settled:
        _pending += 1
    done = threading.Event()

    def write(records):
        global _pending
        if done.is_set():
            return []
        done.set()
        try:
            return generations_record(records=records)
        finally:
            with _settled:
                _pending -= 1
                _settled.notify_all()

    return write


def generations_settled(*, timeout):
    """Wait until every write noted by generations_pending is made; False on timeout."""
    with _settled:
        return _settled.wait_for(lambda: _pending == 0, timeout=timeout)


def generation_log_enabled():
    return settings.GENERATION_LOG_RETENTION_DAYS > 0


def _text(value):
    """Text as PostgreSQL can store it: a model may well write U+0000 (any byte-level token can
    decode to it), which neither text nor jsonb columns accept; it is kept as U+FFFD."""
    return (value or "").replace("\x00", "\ufffd")


def _json(value):
    """A JSON-able copy as JSON would carry it (a Decimal price, a date), NUL characters
    replaced as in _text: the row must never fail to encode."""

    def clean(item):
        if isinstance(item, str):
            return _text(item)
        if isinstance(item, dict):
            return {_text(key): clean(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [clean(inner) for inner in item]
        return item

    return clean(json.loads(json.dumps(value, cls=DjangoJSONEncoder)))


def _row(
    *,
    route,
    version,
    input,
    prompt,
    output,
    parameters,
    finish_reason,
    prompt_tokens,
    completion_tokens,
    timings,
    api_key=None,
    user=None,
    error="",
):
    timings = dict(timings or {})
    return Generation(
        route=route,
        version=version,
        version_name=getattr(version, "name", "") or "",
        api_key=api_key,
        user=user if getattr(user, "is_authenticated", False) else None,
        input=_json(input if input is not None else {}),
        prompt=_text(prompt),
        output=_text(output),
        parameters=_json(parameters or {}),
        finish_reason=finish_reason or "",
        error=_text(error),
        prompt_tokens=prompt_tokens or 0,
        completion_tokens=completion_tokens or 0,
        timings=timings,
        total_ms=timings.get("total_ms"),
    )


def generation_record(
    *,
    route,
    version,
    input,
    prompt,
    output,
    parameters,
    finish_reason,
    prompt_tokens,
    completion_tokens,
    timings,
    api_key=None,
    user=None,
    error="",
):
    """Record one generation (``route``: a Generation.Route; ``timings``: at least total_ms).
    Returns the row, or None when the log is off (GENERATION_LOG_RETENTION_DAYS=0) or the
    database refused the write (logged, never raised)."""
    rows = generations_record(
        records=[
            {
                "route": route,
                "version": version,
                "input": input,
                "prompt": prompt,
                "output": output,
                "parameters": parameters,
                "finish_reason": finish_reason,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "timings": timings,
                "api_key": api_key,
                "user": user,
                "error": error,
            }
        ]
    )
    return rows[0] if rows else None


def generations_record(*, records):
    """Record several generations in one INSERT (``records``: generation_record's arguments
    as dicts). Returns the rows; [] when the log is off or the write failed (logged)."""
    if not records or not generation_log_enabled():
        return []
    try:
        rows = [_row(**record) for record in records]
        # A savepoint of its own: a refused write must not break a transaction around it.
        with transaction.atomic():
            return Generation.objects.bulk_create(rows)
    except Exception:  # noqa: BLE001 - the log is best-effort: an answered request must not fail for it
        logger.exception("Generation log: %d record(s) not written, dropped", len(records))
        return []


def run_records(*, route, run, input, result=None, error="", unfinished_reason="timeout", api_key=None, user=None):
    """generation_record's arguments for a served run (services.generation.Run): one record
    per returned text, so that a curator rates, corrects and turns each text into an example
    on its own. ``result``: the run's answer (its response dict) when it finished; without
    it (``error``: a timeout, a client that left), the text made so far, finished for
    ``unfinished_reason`` (timeout, cancelled). The prompt's tokens
    and the run's timings are the same on each of its records."""
    parameters = dataclasses.asdict(run.params)
    parameters["stop"] = list(parameters["stop"])
    if result is not None:
        texts = [(c["index"], c["text"], c["finish_reason"]) for c in result["choices"]]
        timings = dict(result["timings"])
        seed = result.get("seed")
    else:
        texts = [(s.index, s.text.sent, unfinished_reason) for s in run.generation.sequences]
        timings = run_timings(run)
        seed = run.generation.seed
    if seed is not None:
        parameters["seed"] = seed  # sampled without a seed: the one drawn, so the text can be made again
    n = len(run.generation.sequences)
    records = []
    for index, text, finish_reason in texts:
        records.append(
            {
                "route": route,
                "version": run.version,
                "input": input,
                "prompt": run.prompt,
                "output": text,
                "parameters": {**parameters, "index": index} if n > 1 else parameters,
                "finish_reason": finish_reason,
                "prompt_tokens": run.prompt_tokens,
                "completion_tokens": len(run.generation.sequences[index].tokens),
                "timings": timings,
                "api_key": api_key,
                "user": user,
                "error": error,
            }
        )
    return records


def input_product(input):
    """The product attributes a record's ``input`` asked about, or None (a prompt, a chat).
    The routes record {"product": {...}}; bare attributes ({"name": ...}) are read alike."""
    if not isinstance(input, dict):
        return None
    product = input.get("product")
    if isinstance(product, dict):
        return product or None
    if "prompt" not in input and "messages" not in input and input.get("name"):
        return input
    return None


def run_timings(run):
    """The timings of a run that did not finish (what ran until it ended)."""
    now = time.monotonic()
    first = run.generation.first_token_at
    return {
        "load_ms": round(run.load_seconds * 1000, 1),
        "first_token_ms": None if first is None else round((first - run.started) * 1000, 1),
        "total_ms": round((now - run.started) * 1000, 1),
    }


def generations_purge(*, now=None, batch_size=PURGE_BATCH_SIZE):
    """Delete the records older than GENERATION_LOG_RETENTION_DAYS (with the log off, every
    record), in batches, keeping those a curator rated or made a training example from: they
    are the feedback, not the log. Returns how many were deleted."""
    now = now or timezone.now()
    cutoff = now - datetime.timedelta(days=max(settings.GENERATION_LOG_RETENTION_DAYS, 0))
    expired = (
        Generation.objects.filter(created_at__lt=cutoff)
        .filter(Q(rating="") & Q(example__isnull=True))
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    deleted = 0
    while True:
        batch = list(expired[:batch_size])
        if not batch:
            return deleted
        deleted += Generation.objects.filter(pk__in=batch).delete()[0]
