"""What each key used per UTC day: requests, errors, prompt and generated tokens.

A request adds to a tally in this process; a thread writes the tallies every
USAGE_FLUSH_SECONDS (one UPDATE per key and day, whatever the traffic), and
again when the process exits. So a request costs no database write, and a
process killed without warning loses at most that many seconds of counts. The
limits do not depend on these rows (they count in the cache); the daily
quota only reads them when the cache has lost its count. USAGE_FLUSH_SECONDS=0
writes each request's counts at once.
"""

import atexit
import logging
import threading
import time
from collections import Counter

from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import F

from inference import limits
from inference.models import ApiKeyUsage

logger = logging.getLogger(__name__)

COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens")

_lock = threading.Lock()
_pending = {}  # (key id, day) -> Counter of COUNTS
_flusher = None


def usage_record(*, key_id, **counts):
    """Add ``counts`` (requests, errors, prompt_tokens, completion_tokens) to today's (UTC)
    usage of ``key_id``."""
    unknown = set(counts) - set(COUNTS)
    if unknown:
        raise TypeError(f"unknown usage counts {sorted(unknown)}")
    counts = {name: value for name, value in counts.items() if value}
    if not counts:
        return
    day = limits.today()
    if settings.USAGE_FLUSH_SECONDS <= 0:
        _write(key_id, day, counts)
        return
    with _lock:
        _pending.setdefault((key_id, day), Counter()).update(counts)
        _flusher_start()


def usage_flush():
    """Write every tally of this process now."""
    with _lock:
        batch = dict(_pending)
        _pending.clear()
    for (key_id, day), counts in batch.items():
        try:
            _write(key_id, day, counts)
        except Exception:  # noqa: BLE001 - keep the counts for the next try rather than lose them
            logger.exception("Usage of key %s not written; trying again later", key_id)
            with _lock:
                _pending.setdefault((key_id, day), Counter()).update(counts)


def _write(key_id, day, counts):
    rows = ApiKeyUsage.objects.filter(key_id=key_id, day=day)
    increments = {name: F(name) + value for name, value in counts.items()}
    if rows.update(**increments):
        return
    try:
        with transaction.atomic():
            ApiKeyUsage.objects.create(key_id=key_id, day=day, **counts)
    except IntegrityError:  # another process made today's row first
        rows.update(**increments)


def _flusher_start():
    global _flusher
    if _flusher is None or not _flusher.is_alive():
        _flusher = threading.Thread(target=_flush_loop, name="genapi-usage", daemon=True)
        _flusher.start()


def _flush_loop():
    while True:
        interval = settings.USAGE_FLUSH_SECONDS
        time.sleep(max(interval, 0.05))
        close_old_connections()
        usage_flush()
        connection.close()  # this thread's own connection: never left open between flushes
        if interval <= 0:  # tallying was switched off (a test's settings): nothing more will come
            return


atexit.register(usage_flush)
