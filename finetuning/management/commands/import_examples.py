from django.core.management.base import BaseCommand, CommandError

from finetuning.services.importing import ImportFileError, examples_dry_run, examples_import


class Command(BaseCommand):
    help = (
        "Import training examples from a CSV or JSONL file into a dataset, in one transaction. "
        "Without --map, the mapping is suggested from the file's header (and printed). "
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
            help="Map a file column to an attribute, or to description / split. COLUMN+COLUMN joins several. "
            "A target attributes.KEY is always an attribute (for an attribute named description or split).",
        )
        parser.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="Give every row this attribute."
        )
        parser.add_argument("--strict", action="store_true", help="Import nothing if any row is rejected.")
        parser.add_argument(
            "--dry-run", action="store_true", help="Say what would be imported, rejected and skipped; write nothing."
        )

    def handle(self, *args, **options):
        arguments = {
            "path": options["file"],
            "dataset_name": options["dataset"],
            "mapping_items": options["map"],
            "constant_items": options["set"],
        }
        try:
            if options["dry_run"]:
                summary = examples_dry_run(**arguments, preview_rows=0)
            else:
                summary = examples_import(**arguments, strict=options["strict"])
        except ImportFileError as exc:
            raise CommandError(f"{exc}; nothing imported") from exc
        if not options["map"]:
            used = [f"--map {line}" for line in summary.mapping_lines] + [f"--set {c}" for c in summary.constant_lines]
            self.stdout.write(f"mapping: {' '.join(used) or 'none (native JSONL)'}")
        if options["dry_run"]:
            self.stdout.write("dry run, nothing written:")
        for line in summary.lines():
            self.stdout.write(line)
