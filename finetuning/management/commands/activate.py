"""Make a model version the one the API serves, as the admin's Activate button does: the
artifact is verified first, and the activation is recorded with its reason.

    python manage.py activate VERSION --reason "why"
"""

from django.core.management.base import BaseCommand, CommandError

from finetuning.selectors import version_get
from finetuning.services.versions import VersionError, version_activate


class Command(BaseCommand):
    help = "Activate a model version (by name or id), recording why."

    def add_arguments(self, parser):
        parser.add_argument("version", help="The version's name or id.")
        parser.add_argument("--reason", required=True, help="Why, for the activation history.")

    def handle(self, *args, version, reason, **options):
        if not reason.strip():
            raise CommandError("--reason: say why this version should serve")
        found = version_get(reference=version.strip())
        if found is None:
            raise CommandError(f"version: no model version named {version!r}")
        try:
            version_activate(version=found, reason=reason.strip())
        except VersionError as exc:
            raise CommandError(f"{found.name}: {exc}") from exc
        self.stdout.write(f"{found.name} is now the active version.")
