from django.core.management.base import BaseCommand, CommandError

from finetuning.models import Dataset
from finetuning.services.exporting import FORMATS, dataset_export


class Command(BaseCommand):
    help = (
        "Export a dataset's examples as JSONL ({attributes, description, split} a line) or CSV "
        "(attributes.KEY columns, description, split); import_examples reads either back unchanged."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True, help="Dataset name.")
        parser.add_argument("--format", choices=list(FORMATS), default="jsonl")
        parser.add_argument("--output", help="File to write (default: standard output).")

    def handle(self, *args, dataset, format, output, **options):
        found = Dataset.objects.filter(name=dataset).first()
        if found is None:
            names = ", ".join(Dataset.objects.values_list("name", flat=True)[:20]) or "none"
            raise CommandError(f"no dataset named {dataset!r} (datasets: {names})")
        chunks = dataset_export(dataset=found, fmt=format)
        if not output:
            for chunk in chunks:
                self.stdout.write(chunk, ending="")
            return
        try:
            with open(output, "w", encoding="utf-8", newline="") as handle:
                handle.writelines(chunks)
        except OSError as exc:
            raise CommandError(f"--output {output}: {exc.strerror}") from exc
        self.stderr.write(f"wrote {found.examples.count()} examples of {found.name} to {output} ({format})")
