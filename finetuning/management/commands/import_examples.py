from django.core.management.base import BaseCommand, CommandError

from finetuning.services.importing import ImportFileError, examples_import


class Command(BaseCommand):
    help = (
        "Import training examples from a CSV or JSONL file into a dataset, in one transaction. "
        "Example: import_examples adidas_usa.csv --dataset adidas --map name=name --map color=color "
        "--map category=category+breadcrumbs --map price=selling_price --map description=description"
    )

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--dataset", required=True, help="Dataset name (created if it does not exist).")
        parser.add_argument(
            "--map",
            action="append",
            default=[],
            metavar="TARGET=COLUMN",
            help="Map a file column to an attribute, or to description / split. COLUMN+COLUMN joins several.",
        )
        parser.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="Give every row this attribute."
        )
        parser.add_argument("--strict", action="store_true", help="Import nothing if any row is rejected.")

    def handle(self, *args, **options):
        try:
            summary = examples_import(
                path=options["file"],
                dataset_name=options["dataset"],
                mapping_items=options["map"],
                constant_items=options["set"],
                strict=options["strict"],
            )
        except ImportFileError as exc:
            raise CommandError(f"{exc}; nothing imported") from exc
        for line in summary.lines():
            self.stdout.write(line)
