"""API keys from the shell: create (the key is printed once), list, revoke."""

import datetime

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from inference.models import ApiKey
from inference.services.keys import LIMIT_FIELDS, ApiKeyError, key_create, key_revoke


def _expiry(text):
    """'30d' (from now), '2027-01-31' (midnight UTC) or an ISO date and time."""
    text = text.strip()
    if text.endswith("d") and text[:-1].isdigit():
        return timezone.now() + datetime.timedelta(days=int(text[:-1]))
    moment = parse_datetime(text) or parse_datetime(f"{text}T00:00:00")
    if moment is None:
        raise CommandError(f"--expires: {text!r} is neither a number of days (30d) nor a date (2027-01-31)")
    return moment if timezone.is_aware(moment) else timezone.make_aware(moment, datetime.UTC)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError
    return value


class Command(BaseCommand):
    help = "Create, list and revoke API keys. A new key is printed once; only its sha256 is kept."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="make a key and print it (once)")
        create.add_argument("--name", required=True, help="what uses it")
        create.add_argument("--owner", required=True, help="user name: job scopes act with this user's permissions")
        create.add_argument(
            "--scopes",
            default=",".join(ApiKey.DEFAULT_SCOPES),
            help=f"comma-separated: {', '.join(ApiKey.Scope.values)}, or all (default: %(default)s)",
        )
        create.add_argument("--expires", type=_expiry, help="30d, or a date such as 2027-01-31 (default: never)")
        for name in LIMIT_FIELDS:
            create.add_argument(
                f"--{name.replace('_', '-')}", dest=name, type=_positive, metavar="N", help="default: the setting's"
            )
        create.add_argument(
            "--if-missing", action="store_true", help="do nothing when a usable key of this name and owner exists"
        )
        listing = sub.add_parser("list", help="the keys, without their secrets")
        listing.add_argument("--all", action="store_true", help="revoked and expired keys too")
        revoke = sub.add_parser("revoke", help="refuse a key from the next request on")
        revoke.add_argument("key", help="the key's prefix (gk_…), the key itself, or its id")

    def handle(self, *args, action, **options):
        return getattr(self, f"_{action}")(**options)

    def _create(self, *, name, owner, scopes, expires, if_missing, **options):
        user = get_user_model().objects.filter(username=owner).first()
        if user is None:
            raise CommandError(f"--owner: no user named {owner!r}")
        if if_missing:
            existing = ApiKey.objects.filter(name=name, owner=user, revoked_at__isnull=True).first()
            if existing is not None and (existing.expires_at is None or existing.expires_at > timezone.now()):
                self.stdout.write(f"API key {existing} exists; it was shown when it was made.")
                return
        try:
            key, raw = key_create(
                name=name,
                owner=user,
                scopes=scopes,
                expires_at=expires,
                **{field: options.get(field) for field in LIMIT_FIELDS},
            )
        except ApiKeyError as exc:
            raise CommandError(f"--{exc.field.replace('_', '-')}: {exc.message}") from exc
        self.stderr.write(f"API key {key.name!r} for {user.get_username()} ({', '.join(key.scopes)}); shown only once:")
        self.stdout.write(raw)

    def _list(self, *, all, **options):
        keys = ApiKey.objects.select_related("owner").order_by("created_at")
        if not all:
            keys = keys.filter(revoked_at__isnull=True).exclude(expires_at__lte=timezone.now())
        rows = [("KEY", "NAME", "OWNER", "SCOPES", "LAST USED", "EXPIRES", "STATUS")]
        for key in keys:
            status = (
                "revoked"
                if key.revoked_at
                else "expired"
                if key.expires_at and key.expires_at <= timezone.now()
                else "usable"
            )
            rows.append(
                (
                    f"{key.prefix}…",
                    key.name,
                    key.owner.get_username(),
                    ",".join(key.scopes),
                    f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never",
                    f"{key.expires_at:%Y-%m-%d %H:%M}" if key.expires_at else "never",
                    status,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())

    def _revoke(self, *, key, **options):
        reference = key.strip()
        if reference.startswith("gk_"):
            found = ApiKey.objects.filter(prefix=reference[:11]).first()
        elif reference.isascii() and reference.isdigit():
            found = ApiKey.objects.filter(pk=int(reference)).first()
        else:
            raise CommandError(f"key: give a key's prefix (gk_…) or id, not {reference!r}")
        if found is None:
            raise CommandError(f"key: no API key {reference[:11]!r}")
        was_revoked = found.revoked_at is not None
        key_revoke(key=found)
        self.stdout.write(f"API key {found} {'was already' if was_revoked else 'is now'} revoked.")
