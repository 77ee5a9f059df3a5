from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from finetuning import store
from finetuning.selectors import active_version_get, version_get
from finetuning.services.serving import ServingError, serving_export


class Command(BaseCommand):
    help = (
        "Write a model version's serving folder (its weights, its base's for a LoRA version, the tokenizer, "
        "recipe and manifests) for the serving image, which answers the API without PostgreSQL, Redis or Celery."
    )

    def add_arguments(self, parser):
        parser.add_argument("version", help="The version's name or id; 'active' for the active one.")
        parser.add_argument("--output", help="The folder to write (default: var/serving/<version>); must not exist.")

    def handle(self, *args, version, output=None, **options):
        if version == "active":
            found = active_version_get()
            if found is None:
                raise CommandError("version: no version is active")
        else:
            found = version_get(reference=version)
            if found is None:
                raise CommandError(f"version: no model version named {version!r}")
        output = Path(output) if output else settings.VAR_DIR / "serving" / store.slug(found.name)
        try:
            size = serving_export(version=found, output=output)
        except ServingError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(self.style.SUCCESS(f"Wrote {found.name} to {output} ({size / 2**20:.0f} MiB)."))
        try:
            inside = output.resolve().relative_to(settings.BASE_DIR)
        except ValueError:
            inside = None
        tag = store.slug(found.name).lower()
        if inside is None:
            # docker build sees only its context: the project's folder.
            self.stdout.write(f"Move it under {settings.BASE_DIR / 'var' / 'serving'} to build its image.")
        else:
            self.stdout.write(
                "Its image, built from the project's folder:\n"
                f"  docker build -f docker/Dockerfile --target serving --build-arg SERVING_ARTIFACT={inside} "
                f"-t genapi-serving:{tag} ."
            )
