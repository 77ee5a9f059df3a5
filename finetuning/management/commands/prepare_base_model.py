from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from finetuning.services.base_model import BaseModelError, base_model_prepare
from finetuning.services.versions import base_version_register


class Command(BaseCommand):
    help = (
        "Convert the configured base model (BASE_MODEL_SOURCE) once into a safetensors checkpoint under "
        "MODEL_STORE/base/<name>/ and register it as a model version. Safe to run again."
    )

    def add_arguments(self, parser):
        parser.add_argument("--source", help="Override BASE_MODEL_SOURCE for this run.")
        parser.add_argument("--name", help="Override BASE_MODEL_NAME for this run.")

    def handle(self, *args, source=None, name=None, **options):
        name = name or settings.BASE_MODEL_NAME
        try:
            relpath, sha, created = base_model_prepare(source=source, name=name)
        except BaseModelError as exc:
            raise CommandError(str(exc)) from exc
        where = settings.MODEL_STORE / relpath
        if created:
            self.stdout.write(self.style.SUCCESS(f"Prepared base model {name} at {where} (sha256 {sha[:12]})."))
        else:
            self.stdout.write(f"Base model {name} is already prepared at {where} (sha256 {sha[:12]}); nothing to do.")
        version, registered = base_version_register(base_model=name, relpath=relpath, sha256=sha)
        if registered:
            state = "active" if version.is_active else "not active"
            self.stdout.write(self.style.SUCCESS(f"Registered model version {version.name} ({state})."))
