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
from django.db import DatabaseError, IntegrityError, close_old_connections, connection, transaction
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
        try:
            _write(key_id, day, counts)
            return
        except DatabaseError:  # the database is down: the counts wait in the tally, as below
            logger.warning("Usage of key %s not written (database unreachable); trying again later", key_id)
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


# How often a process that writes each request's counts at once retries those the database
# refused.
RETRY_SECONDS = 2.0


def _flush_loop():
    global _flusher
    while True:
        interval = settings.USAGE_FLUSH_SECONDS
        time.sleep(interval if interval > 0 else RETRY_SECONDS)
        close_old_connections()
        usage_flush()
        connection.close()  # this thread's own connection: never left open between flushes
        with _lock:
            if interval <= 0 and not _pending:  # tallying is off: only refused counts came here
                _flusher = None  # under the lock: the next refused count starts a new thread
                return


atexit.register(usage_flush)
