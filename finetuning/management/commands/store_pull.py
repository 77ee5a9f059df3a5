from django.core.management.base import BaseCommand, CommandError

from finetuning import store


class Command(BaseCommand):
    help = (
        "Download artifacts from the object store (MODEL_STORE_URL) into this machine's cache (MODEL_STORE) "
        "and verify them, so a new machine does not fetch them at its first request. Copies already in the "
        "cache are verified, not downloaded again."
    )

    def add_arguments(self, parser):
        parser.add_argument("relpaths", nargs="*", help="base/<name>, versions/<name> or snapshots/<sha256>.jsonl")
        parser.add_argument(
            "--all", action="store_true", dest="everything", help="Every complete artifact in the object store."
        )

    def handle(self, *args, relpaths=(), everything=False, **options):
        if not store.shared():
            raise CommandError("MODEL_STORE_URL is not set: there is no object store to pull from")
        if everything == bool(relpaths):
            raise CommandError("give the artifacts to pull (e.g. versions/<name>) or --all, not both")
        try:
            relpaths = (
                store.artifacts_remote() if everything else [store.relpath_check(relpath) for relpath in relpaths]
            )
        except store.ArtifactError as exc:
            raise CommandError(str(exc)) from exc
        for relpath in relpaths:
            try:
                store.pull(relpath)
            except store.ArtifactError as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write(f"{relpath}: in the cache and verified")
        self.stdout.write(self.style.SUCCESS(f"Pulled {len(relpaths)} artifacts."))
