from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from finetuning.services.importing import ImportFileError, examples_import

SEED_FILE = Path(__file__).resolve().parents[2] / "seed" / "examples.jsonl"


class Command(BaseCommand):
    help = "Load examples from a JSONL file of {attributes, description[, split]} objects (default: the seed set)."

    def add_arguments(self, parser):
        parser.add_argument("file", nargs="?", default=str(SEED_FILE))
        parser.add_argument("--dataset", default="seed", help="Dataset name (default: seed).")

    def handle(self, *args, file, dataset, **options):
        try:
            summary = examples_import(path=file, dataset_name=dataset)
        except ImportFileError as exc:
            raise CommandError(f"{exc}; nothing imported") from exc
        for line in summary.lines():
            self.stdout.write(line)
