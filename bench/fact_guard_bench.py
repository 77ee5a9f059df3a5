"""Does the fact guard stop invented facts, or move them to facts it does not know? A check with
a held-out half of the fact vocabulary.

    python bench/fact_guard_bench.py --scratch var/report/seed-42 [--version NAME]

The unsupported-claims metric and the fact guard (inference/fact_guard.py) share one vocabulary,
so the guard's own evaluation cannot see a model that, kept from writing "mesh", writes "nylon"
instead. This splits the vocabulary in two halves (terms that share a word stay together, so
that banning "recycled" does not also ban "recycled polyester" in the other half) and generates
the version's text for its whole validation split three ways: without the guard, with the guard
of half A only, and with the whole guard. It prints, for each, the share of outputs with an
unsupported claim of half A and of half B. With the guard of half A, half B's share is the
test: about its unguarded value means the guard's blocked facts did not turn into other facts of
the kinds the vocabulary covers; well above it means they did.

Runs on a report seed's scratch (docs/report.py keeps var/report/seed-N/ with `--keep`, or
while it runs): its SQLite database and model store, read only. About 10 minutes on 2 cores.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup(scratch):
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "genapi.settings.dev",
            "GENAPI_VAR_DIR": str(scratch),
            "DATABASE_URL": f"sqlite:///{scratch / 'report.sqlite3'}",
            "MODEL_STORE": str(scratch / "models"),
            "INFERENCE_NATIVE_DIR": os.environ.get("INFERENCE_NATIVE_DIR", str(ROOT / "var" / "native")),
        }
    )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def halves(terms):
    """Two halves of ``terms``: groups of terms that share a word, alternately, by first term."""
    from finetuning.facts import normal_form

    groups = []
    for term in sorted(terms):
        its_words = set(normal_form(term).split())
        joined = [group for group in groups if its_words & group["words"]]
        merged = {"terms": [term], "words": set(its_words)}
        for group in joined:
            merged["terms"] += group["terms"]
            merged["words"] |= group["words"]
            groups.remove(group)
        groups.append(merged)
    groups.sort(key=lambda group: min(group["terms"]))
    a = sorted(term for group in groups[0::2] for term in group["terms"])
    b = sorted(term for group in groups[1::2] for term in group["terms"])
    return a, b


def generate(loaded, prompts, guard_terms, max_new_tokens):
    from inference.engine import GenerationParams
    from inference.fact_guard import guard_for

    params = GenerationParams(max_new_tokens=max_new_tokens, fact_guard=False)
    texts = []
    for start in range(0, len(prompts), 8):  # batches of 8: the engine's queue is bounded
        pending = []
        for prompt in prompts[start : start + 8]:
            ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            banned = guard_for(loaded.tokenizer, prompt, guard_terms) if guard_terms else None
            pending.append(
                loaded.engine.submit(
                    prompt_ids=ids,
                    sampling=params,
                    max_new_tokens=max_new_tokens,
                    adapter=loaded.adapter,
                    timeout=3600,
                    banned=banned,
                )
            )
        texts += [next(event[2].text for event in generation if event[0] == "done") for generation in pending]
    return texts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, required=True, help="a report seed's scratch, var/report/seed-N")
    parser.add_argument("--version", help="a version name (default: the newest fine-tuned version there)")
    args = parser.parse_args()
    if not (args.scratch / "report.sqlite3").is_file():
        raise SystemExit(f"fact_guard_bench: no report database in {args.scratch}")
    setup(args.scratch.resolve())

    from django.conf import settings

    from finetuning.facts import unsupported
    from finetuning.models import ModelVersion
    from finetuning.prompts import product_prompt
    from finetuning.selectors import fact_vocabulary
    from finetuning.services.evaluations import evaluation_examples
    from inference.loader import model_get

    versions = ModelVersion.objects.exclude(kind=ModelVersion.Kind.BASE).order_by("-pk")
    version = versions.filter(name=args.version).first() if args.version else versions.first()
    if version is None:
        raise SystemExit(f"fact_guard_bench: no version {args.version or '(fine-tuned)'} in {args.scratch}")
    examples = evaluation_examples(version=version, limit=10**9)
    terms = fact_vocabulary()
    a, b = halves(terms)
    loaded = model_get(version)
    prompts = [product_prompt(example["attributes"]) for example in examples]
    print(f"{version.name}: {len(examples)} validation examples; vocabulary {len(terms)} terms, "
          f"half A {len(a)}, half B {len(b)}")  # fmt: skip
    print(f"half A: {', '.join(a)}\nhalf B: {', '.join(b)}\n")
    print(f"{'guard':24}{'claims of half A':>20}{'claims of half B':>20}{'mean words':>14}")
    for name, guard_terms in (("off", None), ("half A only", a), ("whole vocabulary", terms)):
        texts = generate(loaded, prompts, guard_terms, settings.EVALUATION_MAX_NEW_TOKENS)
        shares = []
        for half in (a, b):
            claims = [bool(unsupported(text, e["attributes"], half)) for text, e in zip(texts, examples, strict=True)]
            shares.append(sum(claims) / len(claims))
        words = sum(len(text.split()) for text in texts) / len(texts)
        print(f"{name:24}{100 * shares[0]:>19.1f}%{100 * shares[1]:>19.1f}%{words:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
