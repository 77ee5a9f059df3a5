"""API keys: made, checked, revoked. Only a key's sha256 is stored; the key is
given to its maker once. Keys are random 256-bit secrets, so a plain sha256
is enough (a slow password hash would protect nothing more and cost every
request a hash)."""

import datetime
import hashlib
import hmac
import logging
import secrets
import time

from django.core.cache import cache
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone

from inference import limits
from inference.models import ApiKey

logger = logging.getLogger(__name__)

KEY_START = "gk_"
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "daily_token_quota")
PREFIX_LENGTH = len(KEY_START) + 8
# A key's last-used time is written at most this often: not a database write per request.
LAST_USED_RESOLUTION = datetime.timedelta(seconds=60)
# How long a key's row read from the (shared) cache is used as it is, so that a request costs no
# database read; after that it is read again. Changing or revoking a key, or saving its owner,
# drops it from the cache at once. An older copy is kept for a day: while the database is
# unreachable a key it knows still works (generation goes on through an outage).
CACHED_SECONDS = 60
STALE_SECONDS = 24 * 3600
_CACHED_FIELDS = ("id", "name", "prefix", "key_hash", "scopes", *LIMIT_FIELDS, "expires_at", "last_used_at",
                  "revoked_at", "owner_id", "created_at")  # fmt: skip


class ApiKeyError(ValueError):
    """Bad input for a key: ``field`` names what is wrong."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ApiKeyInvalid(Exception):
    """A request's key cannot be used; the message says why."""


def _digest(raw):
    return hashlib.sha256(raw.encode()).hexdigest()


def scopes_parse(values):
    """Scope names (a list, or comma-separated text; "all" for every scope) -> a sorted list."""
    if isinstance(values, str):
        values = [part for part in values.replace(" ", ",").split(",") if part]
    names = set()
    for value in values:
        if value == "all":
            names.update(ApiKey.Scope.values)
        elif value in ApiKey.Scope.values:
            names.add(value)
        else:
            raise ApiKeyError("scopes", f"unknown scope {value!r}; scopes: {', '.join(ApiKey.Scope.values)}, all")
    if not names:
        raise ApiKeyError("scopes", "give at least one scope")
    return sorted(names, key=ApiKey.Scope.values.index)


def _check(*, name, scopes, expires_at, limits):
    name = (name or "").strip()
    if not name:
        raise ApiKeyError("name", "a key needs a name (what uses it)")
    if len(name) > 100:
        raise ApiKeyError("name", "at most 100 characters")
    scopes = scopes_parse(scopes if scopes is not None else ApiKey.DEFAULT_SCOPES)
    if expires_at is not None and expires_at <= timezone.now():
        raise ApiKeyError("expires_at", "must be in the future")
    for field, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ApiKeyError(field, "must be a whole number of at least 1, or left out for the default")
    return name, scopes


def key_create(*, name, owner, scopes=None, expires_at=None, created_by=None, **limits):
    """Make a key for ``owner``; returns ``(key, the full key)``. The full key exists only
    in this return value: show it to the person who asked, once."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise TypeError(f"unknown limit {sorted(unknown)}")
    name, scopes = _check(name=name, scopes=scopes, expires_at=expires_at, limits=limits)
    if not owner.is_active:
        raise ApiKeyError("owner", f"{owner} is deactivated")
    for _ in range(5):
        prefix = KEY_START + secrets.token_hex(4)
        raw = f"{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                key = ApiKey.objects.create(
                    name=name,
                    owner=owner,
                    prefix=prefix,
                    key_hash=_digest(raw),
                    scopes=scopes,
                    expires_at=expires_at,
                    created_by=created_by,
                    **limits,
                )
            return key, raw
        except IntegrityError:  # the 32-bit prefix is taken: draw again
            continue
    raise RuntimeError("could not draw an unused key prefix")


@transaction.atomic
def keys_install(*, raws, name):
    """Make exactly the full keys ``raws`` (made elsewhere by key_create, e.g. on the full service)
    usable here, with the default scopes, owned by a user named ``name`` that cannot sign in; keys
    installed before and no longer listed are revoked. The serving image runs this at start with
    SERVING_API_KEYS. Returns the number of usable installed keys."""
    from django.contrib.auth import get_user_model

    wanted = {}
    for position, raw in enumerate(raws, start=1):
        raw = raw.strip()
        if not raw.startswith(KEY_START) or len(raw) < PREFIX_LENGTH + 2 or raw[PREFIX_LENGTH] != "_":
            # Never echo the value: it is a secret, or meant to be one.
            raise ApiKeyError("keys", f"key {position} is not a full genapi key (gk_<8 characters>_<secret>)")
        wanted[raw[:PREFIX_LENGTH]] = raw
    owner, _ = get_user_model().objects.get_or_create(username=name, defaults={"is_active": True})
    scopes = list(ApiKey.DEFAULT_SCOPES)
    if owner.has_usable_password():
        owner.set_unusable_password()
        owner.save(update_fields=["password"])
    for prefix, raw in wanted.items():
        key, created = ApiKey.objects.get_or_create(
            prefix=prefix,
            defaults={"name": f"{name} {prefix}", "owner": owner, "key_hash": _digest(raw), "scopes": scopes},
        )
        if not created and (key.owner_id != owner.pk or key.key_hash != _digest(raw)):
            raise ApiKeyError("keys", f"a different key with the prefix {prefix} is already registered here")
        if key.revoked_at is not None:
            ApiKey.objects.filter(pk=key.pk).update(revoked_at=None)
            _forget(prefix)
    gone = ApiKey.objects.filter(owner=owner, revoked_at__isnull=True).exclude(prefix__in=wanted)
    for prefix in gone.values_list("prefix", flat=True):
        _forget(prefix)
    gone.update(revoked_at=timezone.now())
    return len(wanted)


def key_update(*, key, name, scopes, expires_at, **limits):
    """Change what a key may do (its secret never changes: make a new key for that)."""
    name, scopes = _check(name=name, scopes=scopes, expires_at=None, limits=limits)
    key.name, key.scopes, key.expires_at = name, scopes, expires_at
    for field, value in limits.items():
        setattr(key, field, value)
    key.save(update_fields=["name", "scopes", "expires_at", *limits])
    _forget(key.prefix)
    return key


def key_revoke(*, key):
    """Refuse ``key`` from the next request on. Revoking twice changes nothing."""
    if key.revoked_at is None:
        ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        key.refresh_from_db()
    _forget(key.prefix)
    return key


def key_authenticate(*, raw):
    """The usable key ``raw`` names, its request counted (``key.request_window``, for its
    requests per minute); raises ApiKeyInvalid saying why not, the count taken back. From the
    cache, its owner is loaded only when something asks for it (job permissions)."""
    if not raw.startswith(KEY_START) or len(raw) < PREFIX_LENGTH + 2:
        raise ApiKeyInvalid("invalid API key")
    prefix = raw[:PREFIX_LENGTH]
    try:
        found, window = limits.fetch_and_count(_cache_name(prefix), prefix)
    except Exception:  # noqa: BLE001 - the cache is a shortcut: the database answers, limits are not counted
        logger.exception("Limits not enforced: the cache failed")
        found, window = None, None
    try:
        key, owner_active = _key_get(prefix, found)
        _usable(key, owner_active, raw)
    except ApiKeyInvalid:
        # Someone who knows a key's prefix must not spend its limit with wrong secrets.
        limits.uncount(window)
        raise
    key.request_window = window
    return key


def _key_get(prefix, found):
    """(key, whether its owner is active) from the cached fields ``found`` while they are fresh,
    else the database; a stale copy when the database cannot be reached."""
    cached = None
    if found is not None and len(found) == 3:
        fields, owner_active, fresh_until = found
        key = ApiKey(**fields)
        key._state.adding = False
        cached = key, owner_active
        if time.time() < fresh_until:
            return cached
    try:
        key = ApiKey.objects.select_related("owner").filter(prefix=prefix).first()
    except DatabaseError:
        if cached is None:
            raise
        logger.warning("Key %s checked against its cached copy: the database is unreachable", prefix)
        return cached
    if key is None:
        raise ApiKeyInvalid("invalid API key")
    _remember(key, key.owner.is_active)
    return key, key.owner.is_active


def _usable(key, owner_active, raw):
    if not hmac.compare_digest(key.key_hash, _digest(raw)):
        raise ApiKeyInvalid("invalid API key")
    now = timezone.now()
    if key.revoked_at is not None:
        raise ApiKeyInvalid(f"this API key was revoked on {key.revoked_at:%Y-%m-%d %H:%M} UTC")
    if key.expires_at is not None and key.expires_at <= now:
        raise ApiKeyInvalid(f"this API key expired on {key.expires_at:%Y-%m-%d %H:%M} UTC")
    if not owner_active:
        raise ApiKeyInvalid("this API key's owner is deactivated")
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        try:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        except DatabaseError:  # a cached key still works through a database outage; the time waits
            logger.warning("Last use of key %s not recorded (database unreachable)", key.prefix)
            return
        key.last_used_at = now
        _remember(key, owner_active)


def _cache_name(prefix):
    return f"apikey:{prefix}"


def _remember(key, owner_active):
    try:
        fields = {name: getattr(key, name) for name in _CACHED_FIELDS}
        cache.set(_cache_name(key.prefix), (fields, owner_active, time.time() + CACHED_SECONDS), STALE_SECONDS)
    except Exception:  # noqa: BLE001
        pass


def _forget(prefix):
    try:
        cache.delete(_cache_name(prefix))
    except Exception:  # noqa: BLE001
        pass


def owner_saved(sender, instance, **kwargs):
    """A user was saved (deactivated, perhaps): their keys are read from the database again."""
    for prefix in ApiKey.objects.filter(owner=instance).values_list("prefix", flat=True):
        _forget(prefix)
