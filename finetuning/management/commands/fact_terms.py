"""The fact vocabulary of the unsupported-claims metric: what it holds, and candidates for it.

    python manage.py fact_terms list
    python manage.py fact_terms suggest --dataset NAME [--min-share 0.02]

``suggest`` lists the word sequences that recur in the dataset's training descriptions and are
not in the vocabulary yet, most frequent first, for a person to review: most are not product
facts. Add the ones that are in the admin (Fact terms), or, for every installation, to
finetuning/fact_terms.json."""

from django.core.management.base import BaseCommand, CommandError

from finetuning.facts import candidates, normal_form, shipped_terms
from finetuning.models import Dataset, FactTerm, TrainingExample
from finetuning.selectors import fact_vocabulary


class Command(BaseCommand):
    help = "List the fact vocabulary of the unsupported-claims metric, or suggest terms for it."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=("list", "suggest"))
        parser.add_argument("--dataset", help="suggest: the dataset whose training descriptions to read.")
        parser.add_argument(
            "--min-share", type=float, default=0.02, help="suggest: in at least this share of them (default 0.02)."
        )

    def handle(self, *args, action, dataset, min_share, **options):
        if action == "list":
            added = dict(FactTerm.objects.values_list("term", "kind"))
            shipped = shipped_terms()
            for term in fact_vocabulary():
                source = "shipped" if term in shipped else "added"
                self.stdout.write(f"{term}\t{shipped.get(term) or added.get(term)}\t{source}")
            return
        if not dataset:
            raise CommandError("suggest needs --dataset NAME")
        if not 0 < min_share <= 1:
            raise CommandError("--min-share must be above 0 and at most 1")
        found = Dataset.objects.filter(name=dataset).first()
        if found is None:
            raise CommandError(f"--dataset: no dataset named {dataset!r}")
        descriptions = sorted(
            set(
                TrainingExample.objects.filter(dataset=found)
                .exclude(split=TrainingExample.Split.VALIDATION)
                .values_list("description", flat=True)
            )
        )
        if not descriptions:
            raise CommandError(f"--dataset: {dataset} has no training descriptions")
        known = {normal_form(term) for term in fact_vocabulary()}
        self.stdout.write(f"{len(descriptions)} distinct training descriptions of {dataset}; "
                          f"not in the vocabulary, in at least {min_share:.0%} of them:")  # fmt: skip
        for phrase, count in candidates(descriptions, min_share=min_share):
            if normal_form(phrase) not in known:
                self.stdout.write(f"{count}\t{phrase}")
