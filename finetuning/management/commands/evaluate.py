import dataclasses
import json
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from finetuning.metrics import METRICS, metric_format
from finetuning.models import ModelVersion
from finetuning.scoring import Decoding, version_score, work_units
from finetuning.selectors import active_version_get, fact_vocabulary, version_get
from finetuning.services.evaluations import EvaluationError, evaluation_examples
from finetuning.services.importing import ImportFileError, examples_read
from finetuning.services.versions import base_version_name


def _version_resolve(reference):
    if reference == "active":
        version = active_version_get()
        if version is None:
            raise CommandError("--version active: no version is active")
        return version
    if reference == "base":
        name = base_version_name(settings.BASE_MODEL_NAME)
        version = ModelVersion.objects.filter(name=name).first()
        if version is None:
            raise CommandError(f"--version base: {name} is not registered; run `python manage.py prepare_base_model`")
        return version
    version = version_get(reference=reference)
    if version is None:
        raise CommandError(f"--version {reference}: no such model version (give a name, an id, active or base)")
    return version


class Command(BaseCommand):
    help = (
        "Score a model version on held-out examples: loss, perplexity, ROUGE-L, chrF, BLEU, attribute coverage, "
        "length, repetition and format failures. By default on the validation split the version was trained "
        "with; --file scores it on any CSV or JSONL file without importing it. Prints a table; --json writes "
        "the metrics and every output."
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        # Our --version names a model version; it replaces Django's "show the Django version".
        return super().create_parser(prog_name, subcommand, conflict_handler="resolve", **kwargs)

    def add_arguments(self, parser):
        parser.add_argument("--version", required=True, help="A version name or id, active, or base.")
        parser.add_argument("--file", help="A CSV or JSONL file of products with reference descriptions.")
        parser.add_argument(
            "--map", action="append", default=[], metavar="TARGET=COLUMN", help="As for import_examples."
        )
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="As for import_examples.")
        parser.add_argument(
            "--split-of",
            metavar="VERSION",
            help="Score on the validation split VERSION was trained with (to compare, e.g., base on it).",
        )
        parser.add_argument(
            "--limit", type=int, default=None, help="At most N examples (default EVALUATION_MAX_EXAMPLES)."
        )
        parser.add_argument("--max-new-tokens", type=int, default=None, help="Default EVALUATION_MAX_NEW_TOKENS.")
        parser.add_argument(
            "--fact-guard",
            choices=("on", "off"),
            default=None,
            help="Generate with the fact guard on or off (default EVALUATION_FACT_GUARD).",
        )
        parser.add_argument(
            "--no-repeat-ngram-size",
            type=int,
            default=None,
            metavar="N",
            help="No token N-gram written twice in a text; 0: no such rule (default EVALUATION_NO_REPEAT_NGRAM_SIZE).",
        )
        parser.add_argument(
            "--min-new-tokens",
            type=int,
            default=None,
            metavar="N",
            help="No end of text before N new tokens; 0: no floor (default EVALUATION_MIN_NEW_TOKENS).",
        )
        parser.add_argument("--json", type=Path, help="Write the metrics and outputs here.")

    def handle(self, *args, **options):
        limit = settings.EVALUATION_MAX_EXAMPLES if options["limit"] is None else options["limit"]
        if limit < 1:
            raise CommandError("--limit must be at least 1")
        if options["file"] and options["split_of"]:
            raise CommandError("give --file or --split-of, not both")
        version = _version_resolve(options["version"].strip())
        decoding = Decoding.from_settings()
        if options["max_new_tokens"] is not None:
            if not 1 <= options["max_new_tokens"] <= settings.GENERATE_MAX_NEW_TOKENS:
                raise CommandError(f"--max-new-tokens must be between 1 and {settings.GENERATE_MAX_NEW_TOKENS}")
            decoding = dataclasses.replace(decoding, max_new_tokens=options["max_new_tokens"])
        if options["fact_guard"] is not None:
            decoding = dataclasses.replace(decoding, fact_guard=options["fact_guard"] == "on")
        if options["no_repeat_ngram_size"] is not None:
            if options["no_repeat_ngram_size"] < 0:
                raise CommandError("--no-repeat-ngram-size must be 0 (off) or more")
            decoding = dataclasses.replace(decoding, no_repeat_ngram_size=options["no_repeat_ngram_size"])
        if options["min_new_tokens"] is not None:
            if options["min_new_tokens"] < 0:
                raise CommandError("--min-new-tokens must be 0 (no floor) or more")
            decoding = dataclasses.replace(decoding, min_new_tokens=options["min_new_tokens"])
        examples, source = self._examples(options, version, limit)

        from tqdm import tqdm

        with tqdm(total=work_units(examples), desc=f"evaluate {version.name}", file=sys.stderr, unit="step") as bar:

            def progress(done):
                bar.update(done - bar.n)

            try:
                score = version_score(version, examples, decoding, fact_terms=fact_vocabulary(), on_progress=progress)
            except Exception as exc:  # one line, not a traceback
                raise CommandError(f"evaluating {version.name} failed: {type(exc).__name__}: {exc}") from exc

        self.stdout.write(f"{version.name} on {source}, {len(examples)} examples, greedy, "
                          f"max_new_tokens={decoding.max_new_tokens}, repetition_penalty={decoding.repetition_penalty:g}, "
                          f"no_repeat_ngram_size={decoding.no_repeat_ngram_size}, min_new_tokens={decoding.min_new_tokens}, "
                          f"fact guard {'on' if decoding.fact_guard else 'off'}")  # fmt: skip
        width = max(len(metric.label) for metric in METRICS.values())
        for key, metric in METRICS.items():
            self.stdout.write(f"  {metric.label:<{width}}  {metric_format(key, score.metrics.get(key)):>10}")
        if options["json"]:
            payload = {
                "version": {"id": version.pk, "name": version.name, "kind": version.kind},
                "source": source,
                "decoding": decoding.as_dict(),
                "metrics": score.metrics,
                "examples": [
                    {
                        **{k: v for k, v in example.items() if k != "description"},
                        "reference": example["description"],
                        **output,
                    }
                    for example, output in zip(examples, score.outputs, strict=True)
                ],
            }
            try:
                options["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
            except OSError as exc:
                raise CommandError(f"--json {options['json']}: {exc.strerror}") from exc
            self.stdout.write(f"wrote {options['json']}")

    def _examples(self, options, version, limit):
        if options["file"]:
            try:
                summary, cleaned = examples_read(
                    path=options["file"], mapping_items=options["map"], constant_items=options["set"], label="evaluate"
                )
            except ImportFileError as exc:
                raise CommandError(str(exc)) from exc
            for row, reason in summary.rejected[:5]:
                self.stderr.write(f"skipped row {row}: {reason}")
            if len(summary.rejected) > 5:
                self.stderr.write(f"… and {len(summary.rejected) - 5} more rows skipped")
            if not cleaned:
                raise CommandError(f"{options['file']}: no row makes a product with a description to score against")
            examples = [
                {"row": fields["row"], "attributes": fields["attributes"], "description": fields["description"]}
                for fields in list(cleaned.values())[:limit]
            ]
            return examples, f"{options['file']} (rows {examples[0]['row']}–{examples[-1]['row']})"
        owner = _version_resolve(options["split_of"].strip()) if options["split_of"] else version
        try:
            rows = evaluation_examples(version=owner, limit=limit)
        except EvaluationError as exc:
            raise CommandError(str(exc)) from exc
        examples = [
            {"id": row["id"], "attributes": row["attributes"], "description": row["description"]} for row in rows
        ]
        return examples, f"the validation split of {owner.name} (snapshot {owner.snapshot.sha256[:12]})"
