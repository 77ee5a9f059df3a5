from django.core.management.base import BaseCommand, CommandError

from finetuning import store


class Command(BaseCommand):
    help = (
        "Upload artifacts of this machine's model store (MODEL_STORE) to the object store (MODEL_STORE_URL), "
        "each verified against its manifest first and its manifest uploaded last: how an existing filesystem "
        "store moves to a bucket. Artifacts the bucket has already are left as they are."
    )

    def add_arguments(self, parser):
        parser.add_argument("relpaths", nargs="*", help="base/<name>, versions/<name> or snapshots/<sha256>.jsonl")
        parser.add_argument(
            "--all", action="store_true", dest="everything", help="Every complete artifact in MODEL_STORE."
        )

    def handle(self, *args, relpaths=(), everything=False, **options):
        if not store.shared():
            raise CommandError("MODEL_STORE_URL is not set: there is no object store to push to")
        if everything == bool(relpaths):
            raise CommandError("give the artifacts to push (e.g. versions/<name>) or --all, not both")
        try:
            relpaths = store.artifacts_local() if everything else [store.relpath_check(relpath) for relpath in relpaths]
        except store.ArtifactError as exc:
            raise CommandError(str(exc)) from exc
        pushed = 0
        for relpath in relpaths:
            try:
                uploaded = store.push(relpath)
            except store.ArtifactError as exc:
                raise CommandError(str(exc)) from exc
            pushed += uploaded
            self.stdout.write(f"{relpath}: {'uploaded' if uploaded else 'already in the object store'}")
        self.stdout.write(self.style.SUCCESS(f"Pushed {pushed} of {len(relpaths)} artifacts."))
