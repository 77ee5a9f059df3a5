"""Per-key limits and sign-in throttling, counted in Django's cache.

Every process that shares the cache (Redis, when CACHE_URL names one) counts
into the same keys, so a limit holds across web processes and machines; with
the default local-memory cache each process counts on its own.

Requests and tokens per minute are sliding windows: a fixed one-minute counter
plus the previous minute's, weighted by how much of it still lies within the
last 60 seconds (so a client cannot spend two minutes' worth across a minute
boundary). A generation reserves ``max_tokens x n`` tokens when it starts and
settles to what it really generated when it ends, so that a burst of
concurrent requests cannot overrun the limit before any of them finishes. The
daily quota is a counter per UTC day, seeded from the usage table when the
cache has lost it.

When the cache cannot be reached, requests are let through and the error is
logged: a cache outage must not take generation down with it.
"""

import datetime
import hashlib
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)

MINUTE = 60
DAY = 24 * 3600


def clock():
    """Seconds since the epoch; the one clock of every limit (tests replace it)."""
    return time.time()


def today():
    """The UTC day that usage and the daily quota are counted in."""
    return datetime.datetime.fromtimestamp(clock(), datetime.UTC).date()


class LimitExceeded(Exception):
    """``limit``: requests_per_minute, tokens_per_minute, daily_token_quota or failed_logins."""

    def __init__(self, limit, message, retry_after):
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after = retry_after


# --- Counters in the cache ------------------------------------------------------


def _redis_client():
    """The raw client when the cache is Django's Redis backend: each update is then one
    server-side script, one round trip."""
    from django.core.cache import caches
    from django.core.cache.backends.redis import RedisCache

    backend = caches["default"]  # not the `cache` proxy, which isinstance() does not see through
    if not isinstance(backend, RedisCache):
        return None
    # A client per backend (each thread has its own), on the backend's connection pool: making one
    # per call cost as much as the round trip.
    client = getattr(backend, "_genapi_client", None)
    if client is None:
        client = backend._genapi_client = backend._cache.get_client(write=True)
    return client


# Django's Redis backend stores integers as plain numbers, so these scripts and its get() agree.
# KEYS: the counters to add ARGV[1] to (ARGV[2] of them, each kept ARGV[2 + i] seconds), then
# the counters to read.
_ADD_AND_READ = """
local n = tonumber(ARGV[2])
local added, read = {}, {}
for i = 1, n do
  added[i] = redis.call('INCRBY', KEYS[i], ARGV[1])
  redis.call('EXPIRE', KEYS[i], ARGV[2 + i])
end
for i = n + 1, #KEYS do read[i - n] = redis.call('GET', KEYS[i]) or '0' end
return {added, read}
"""
_ADD_IF_PRESENT = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[1]) end
end
return 0
"""
_scripts = {}


def _run(client, source, keys, args):
    """EVALSHA ``source`` (loaded on first use) with ``client``, a connection of the cache's pool."""
    if source not in _scripts:
        _scripts[source] = client.register_script(source)
    return _scripts[source](keys=keys, args=args, client=client)


_FETCH_AND_COUNT = """
local found = redis.call('GET', KEYS[1])
local value = redis.call('INCRBY', KEYS[2], 1)
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {found or false, value, redis.call('GET', KEYS[3]) or '0'}
"""


def fetch_and_count(name, ident):
    """Read the cached value ``name`` and count a request into the requests window of
    ``ident`` (a key's prefix), in one round trip: (the value or None, the window). The
    lookup of a key and the count of its request are one trip to Redis, not two; the
    caller takes the count back (uncount) if the request turns out not to be the key's."""
    current, previous, fraction = _Window.keys("requests", ident, MINUTE)
    client = _redis_client()
    if client is None:
        found = cache.get(name)
        (value,), (before,) = _add_and_read([(current, _window_ttl(MINUTE))], 1, [previous])
    else:
        from django.core.cache import caches

        names = [cache.make_and_validate_key(item) for item in (name, current, previous)]
        data, value, before = _run(client, _FETCH_AND_COUNT, names, [_window_ttl(MINUTE)])
        found = caches["default"]._cache._serializer.loads(data) if data else None
    return found, _Window(current, int(before), int(value) - 1, fraction, MINUTE)


def uncount(window):
    """Take back a request counted by fetch_and_count."""
    if window is not None:
        _guarded(_add)([window.key], -1)


def _add_and_read(adds, amount, reads):
    """Add ``amount`` to each counter of ``adds`` ([(key, seconds kept)], created when absent)
    and read the counters ``reads``, in one round trip with Redis: ([new values], [values read,
    0 when absent])."""
    client = _redis_client()
    if client is not None:
        names = [cache.make_and_validate_key(name) for name in [key for key, _ in adds] + list(reads)]
        added, found = _run(client, _ADD_AND_READ, names, [amount, len(adds), *(ttl for _, ttl in adds)])
        return [int(value) for value in added], [int(value) for value in found]
    added = []
    for key, ttl in adds:
        try:
            added.append(cache.incr(key, amount))
        except ValueError:
            added.append(amount if cache.add(key, amount, ttl) else cache.incr(key, amount))
    found = cache.get_many(list(reads)) if reads else {}
    return added, [int(found.get(name, 0)) for name in reads]


def _add(keys, amount):
    """Add ``amount`` to the counters ``keys`` that still exist (one expired meanwhile has
    nothing left to correct)."""
    keys = [key for key in keys if key]
    if not amount or not keys:
        return
    client = _redis_client()
    if client is not None:
        _run(client, _ADD_IF_PRESENT, [cache.make_and_validate_key(key) for key in keys], [amount])
        return
    for key in keys:
        try:
            cache.incr(key, amount)
        except ValueError:
            pass


@dataclass
class _Window:
    """One sliding-window count: where it is kept, and what it was before this request."""

    key: str
    previous: int
    current: int  # before this request's amount
    fraction: float  # of the current window elapsed
    period: int

    @staticmethod
    def keys(name, ident, period):
        """(this window's counter, the previous one's, the share of this window elapsed)."""
        now = clock()
        index = int(now // period)
        return f"limit:{name}:{ident}:{index}", f"limit:{name}:{ident}:{index - 1}", (now % period) / period

    @classmethod
    def hit(cls, name, ident, amount, period):
        current, previous, fraction = cls.keys(name, ident, period)
        (value,), (before,) = _add_and_read([(current, _window_ttl(period))], amount, [previous])
        return cls(current, before, value - amount, fraction, period)

    @classmethod
    def read(cls, name, ident, period):
        current, previous, fraction = cls.keys(name, ident, period)
        found = cache.get_many([current, previous])
        return cls(current, int(found.get(previous, 0)), int(found.get(current, 0)), fraction, period)

    @property
    def count(self):
        return self.previous * (1 - self.fraction) + self.current

    def retry_after(self, limit, cost=1):
        """Seconds until ``cost`` more fits under ``limit``, if nothing else arrives."""
        if self.count + cost <= limit:
            return 0
        if self.current + cost <= limit:  # wait for the previous window's weight to fall
            needed = 1 - self.fraction - (limit - cost - self.current) / self.previous
            return max(1, math.ceil(needed * self.period))
        rest = (1 - self.fraction) * self.period
        return max(1, math.ceil(rest + max(0.0, 1 - (limit - cost) / self.current) * self.period))


def _window_ttl(period):
    return 2 * period + 5  # the window and the next, which still weighs it


def _seconds_to_midnight():
    return max(1, math.ceil(DAY - clock() % DAY))


def _guarded(function):
    """Run a limit check; when the cache fails, log it and let the request through."""

    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except LimitExceeded:
            raise
        except Exception:  # noqa: BLE001 - any cache error: serve rather than fail
            logger.exception("Limits not enforced: the cache failed")
            return None

    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    return wrapper


# --- API keys -------------------------------------------------------------------


@dataclass
class RequestAdmission:
    limit: int
    remaining: int


def request_admit(key, window):
    """Decide on a request of ``key`` already counted into ``window`` (fetch_and_count);
    raises LimitExceeded past its requests per minute, taking the count back (a refused
    request does not count). Returns what is left of the limit (None without one)."""
    limit = key.limit("requests_per_minute")
    if limit is None or window is None:
        return None
    if window.count + 1 > limit:
        uncount(window)
        retry = window.retry_after(limit)
        raise LimitExceeded(
            "requests_per_minute",
            f"this API key's limit of {limit} requests per minute is reached; retry in {retry} s",
            retry,
        )
    return RequestAdmission(limit, max(0, math.floor(limit - window.count - 1)))


@dataclass
class Reservation:
    """Tokens set aside for a generation until it ends."""

    amount: int
    minute_key: str | None = None
    quota_key: str | None = None
    limit: int | None = None
    remaining: int | None = None
    settled: bool = False

    @_guarded
    def settle(self, used):
        """Replace the reservation with the ``used`` tokens (once)."""
        if self.settled:
            return
        self.settled = True
        _add([self.minute_key, self.quota_key], used - self.amount)


def _quota_key(key):
    return f"quota:{key.pk}:{today().isoformat()}"


@_guarded
def tokens_reserve(key, amount):
    """Set ``amount`` tokens aside for a generation by ``key``; raises LimitExceeded when its
    tokens per minute or its daily quota are used up. A request is let in while at least one
    token is left, then charged what it really generates (Reservation.settle). One round trip
    to Redis, both counters at once."""
    reservation = Reservation(amount)
    limit, quota = key.limit("tokens_per_minute"), key.limit("daily_token_quota")
    adds, reads = [], []
    if limit is not None:
        current, previous, fraction = _Window.keys("tokens", key.pk, MINUTE)
        adds.append((current, _window_ttl(MINUTE)))
        reads.append(previous)
    if quota is not None:
        adds.append((_quota_key(key), DAY + 3600))
    if not adds:
        return reservation
    added, read = _add_and_read(adds, amount, reads)
    if limit is not None:
        window = _Window(current, read[0], added[0] - amount, fraction, MINUTE)
        reservation.minute_key, reservation.limit = current, limit
        reservation.remaining = max(0, math.floor(limit - window.count - amount))
    if quota is not None:
        reservation.quota_key = adds[-1][0]
        used = added[-1] - amount
        if used == 0:  # the first tokens of the day here, or the cache lost its count
            used = _quota_seed(key, reservation.quota_key)
    if limit is not None and window.count + 1 > limit:
        _add([reservation.minute_key, reservation.quota_key], -amount)
        retry = window.retry_after(limit)
        raise LimitExceeded(
            "tokens_per_minute",
            f"this API key's limit of {limit} generated tokens per minute is reached; retry in {retry} s",
            retry,
        )
    if quota is not None and used + 1 > quota:
        _add([reservation.minute_key, reservation.quota_key], -amount)
        raise LimitExceeded(
            "daily_token_quota",
            f"this API key's daily quota of {quota} generated tokens is used up; it renews at 00:00 UTC",
            _seconds_to_midnight(),
        )
    return reservation


def _quota_seed(key, name):
    """Add what the usage table says ``key`` generated today to its quota counter ``name``,
    which has just started from nothing; what it had used before this request."""
    from inference.selectors import usage_completion_tokens

    recorded = usage_completion_tokens(key_id=key.pk, day=today())
    if recorded:
        _add_and_read([(name, DAY + 3600)], recorded, [])
    return recorded


def key_limits_now(key):
    """What is left of each limit of ``key`` this minute and today, for GET /api/usage."""
    result = {}
    for name, window_name, ident in (
        ("requests_per_minute", "requests", key.prefix),
        ("tokens_per_minute", "tokens", key.pk),
    ):
        limit = key.limit(name)
        used = None
        if limit is not None:
            try:
                used = math.ceil(_Window.read(window_name, ident, MINUTE).count)
            except Exception:  # noqa: BLE001
                logger.exception("The cache failed")
        result[name] = {"limit": limit, "used": used}
    quota = key.limit("daily_token_quota")
    used = None
    if quota is not None:
        try:
            used = cache.get(_quota_key(key))
        except Exception:  # noqa: BLE001
            logger.exception("The cache failed")
        if used is None:
            from inference.selectors import usage_completion_tokens

            used = usage_completion_tokens(key_id=key.pk, day=today())
    result["daily_token_quota"] = {"limit": quota, "used": used}
    return result


# --- Sign-in throttling -----------------------------------------------------------


def _address_id(address):
    # Hashed: an address from X-Forwarded-For is client text, not a safe cache key.
    return hashlib.sha256(address.encode("utf-8", "replace")).hexdigest()[:32]


@_guarded
def login_check(address):
    """Raise LimitExceeded when ``address`` failed to sign in too often lately; called
    before a password is checked, so a refused guess costs no password hash."""
    limit, period = settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW_SECONDS
    window = _Window.read("logins", _address_id(address), period)
    if window.count + 1 > limit:
        retry = window.retry_after(limit)
        raise LimitExceeded(
            "failed_logins", f"too many failed sign-ins from this address; try again in {retry} s", retry
        )


@_guarded
def login_failure_record(address):
    _Window.hit("logins", _address_id(address), 1, settings.LOGIN_FAILURE_WINDOW_SECONDS)


@lru_cache(maxsize=8)
def _networks(proxies):
    return tuple(ipaddress.ip_network(proxy.strip(), strict=False) for proxy in proxies if proxy.strip())


def _is_proxy(address):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _networks(tuple(settings.TRUSTED_PROXIES)))


def client_address(meta):
    """The client's address: REMOTE_ADDR, unless that is a trusted proxy (TRUSTED_PROXIES);
    then the nearest address in X-Forwarded-For that is not one. A client can write anything
    into X-Forwarded-For, so it is read only from a proxy's request."""
    remote = meta.get("REMOTE_ADDR", "") or ""
    if not _is_proxy(remote):
        return remote
    forwarded = [part.strip() for part in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
    for address in reversed(forwarded):
        if not _is_proxy(address):
            return address
    return forwarded[0] if forwarded else remote
