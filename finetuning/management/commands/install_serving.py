from django.core.management.base import BaseCommand, CommandError

from finetuning.services.serving import ServingError, serving_install


class Command(BaseCommand):
    help = (
        "Register a serving folder's version (manage.py export_serving) in this registry as the active version. "
        "MODEL_STORE must be the folder's models/. The serving image runs it when it is built."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory", help="The serving folder.")

    def handle(self, *args, directory, **options):
        try:
            version, created = serving_install(directory=directory)
        except ServingError as exc:
            raise CommandError(str(exc)) from exc
        said = "Registered and activated" if created else "Already registered:"
        self.stdout.write(self.style.SUCCESS(f"{said} {version.name} (sha256 {version.sha256[:12]})."))
