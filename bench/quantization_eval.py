"""Does int8 serving keep the quality of fp32? Evaluation metrics, side by side.

    python bench/quantization_eval.py [--examples 40] [--new-tokens 128] [--version NAME] [--json PATH]

On held-out products (the last ``--examples`` distinct descriptions of
``../shared/data/adidas_usa.csv``, mapped as the importer maps them) the
serving engine is run twice on the same weights, fp32 (``INFERENCE_QUANTIZE=
none``) and int8, and for each it computes:

- validation loss and perplexity of the reference descriptions, teacher-forced
  with the training prompt (the loss training reports: mean over description
  tokens and the end-of-turn marker), computed the way serving computes: the
  prompt in one pass, the description in decode-sized pieces (the int8 path);
- ROUGE-L F1 (word level, longest common subsequence) of the greedy output
  against the reference description;
- mean words per output, and the share of outputs cut off by ``--new-tokens``;
- the share of outputs identical to fp32's.

It prints each metric's relative change; the int8 setting is acceptable when
every quality metric moves by less than 1% of its fp32 value.

Uses the prepared base model, or a registered version (``--version``: a LoRA
version runs on the base with its adapter, as served). This is an
evaluation, not a test: it exits 0 whatever the numbers.
"""

import argparse
import csv
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import ADIDAS_CSV, django_setup  # noqa: E402

TOLERANCE = 0.01


def held_out(path, count):
    """The last ``count`` products with distinct descriptions, in file order."""
    from train_bench import ADIDAS_MAPPING

    from finetuning.services.examples import ExampleError, example_clean
    from finetuning.services.importing import mapping_parse, row_to_example

    mapping = mapping_parse(ADIDAS_MAPPING)
    rows, seen = [], set()
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for row in reversed(list(csv.DictReader(handle))):
            attributes, description, _ = row_to_example(row, mapping, {})
            try:
                fields = example_clean(attributes=attributes, description=description)
            except ExampleError:
                continue
            if fields["description"] in seen:
                continue
            seen.add(fields["description"])
            rows.append((fields["attributes"], fields["description"]))
            if len(rows) == count:
                break
    return rows[::-1]


def words(text):
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate, reference):
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def served_logits(scorer, prompt_ids, target_ids, adapter):
    """The logits predicting each target token, computed as serving computes them: the
    prompt in one pass (fp32 weights, as for every prompt), then the continuation in
    pieces of at most the rows a decode step has, which run the int8 kernel when quantized.
    Scoring the whole text in one pass would use the fp32 weights throughout and measure
    nothing of int8."""
    import torch

    from inference.engine import _INT8_KERNEL_MAX_ROWS

    with torch.inference_mode():
        prompt = scorer._forward(torch.tensor([prompt_ids]), None, prefill=True, slot=0, adapter=adapter)
        pieces, position = [prompt], len(prompt_ids)
        rest = target_ids[:-1]
        for offset in range(0, len(rest), _INT8_KERNEL_MAX_ROWS):
            chunk = rest[offset : offset + _INT8_KERNEL_MAX_ROWS]
            pieces.append(
                scorer._forward(
                    torch.tensor([chunk]), None, prefill=True, slot=0, adapter=adapter, start=position, every=True
                )  # fmt: skip
            )
            position += len(chunk)
    return torch.cat(pieces)


def evaluate(version, quantize, examples, new_tokens):
    import torch
    import torch.nn.functional as F
    from django.test import override_settings

    from finetuning import prompts
    from inference import loader
    from inference.engine import Engine
    from inference.generation import GenerationParams, generation_collect, generation_submit

    loader.cache_clear()
    with override_settings(INFERENCE_QUANTIZE=quantize, GENERATE_QUEUE_SIZE=len(examples) + 1):
        loaded = loader.model_get(version)
    tokenizer = loaded.tokenizer
    nll, targets = 0.0, 0
    started = time.monotonic()
    # A one-slot engine of its own on the same weights, driven directly: its cache is scratch.
    scorer = Engine(loaded.weights.decoder, tokenizer, stop_token_ids=[], max_batch=1, max_queue=1,
                    max_tokens=loaded.max_positions, name="scorer")  # fmt: skip
    # All at once: the engine batches them, as it would concurrent clients.
    params = GenerationParams(max_new_tokens=new_tokens)
    submitted = [
        generation_submit(loaded, prompts.product_prompt(attributes), params, timeout=3600)
        for attributes, _ in examples
    ]
    for attributes, description in examples:
        prompt, completion = prompts.training_pair(attributes, description)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        predicted = served_logits(scorer, prompt_ids, target_ids, loaded.adapter)
        nll += float(F.cross_entropy(predicted, torch.tensor(target_ids), reduction="sum"))
        targets += len(target_ids)
    outputs = [generation_collect(generation, count).completions[0] for generation, count in submitted]
    scorer.close(wait=10)
    loader.cache_clear(wait=10)
    loss = nll / targets
    return {
        "quantize": quantize,
        "validation_loss": loss,
        "perplexity": math.exp(loss),
        "rouge_l": 100 * sum(rouge_l(c.text, d) for c, (_, d) in zip(outputs, examples, strict=True)) / len(outputs),
        "mean_words": sum(len(words(c.text)) for c in outputs) / len(outputs),
        "cut_off": sum(c.finish_reason == "length" for c in outputs) / len(outputs),
        "texts": [c.text for c in outputs],
        "seconds": time.monotonic() - started,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--version", default=None, help="a model version name (default: the base model)")
    parser.add_argument("--csv", type=Path, default=ADIDAS_CSV)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    django_setup()
    from django.conf import settings

    from finetuning import store
    from finetuning.models import ModelVersion
    from finetuning.services.versions import base_version_name

    name = args.version or base_version_name(settings.BASE_MODEL_NAME)
    version = ModelVersion.objects.filter(name=name).first()
    if version is None:
        # The base model prepared but not registered in this database: serve its artifact as is.
        relpath = store.base_relpath(settings.BASE_MODEL_NAME)
        manifest = store.absolute(relpath) / store.MANIFEST
        if args.version or not manifest.is_file():
            print(f"no model version {name!r}: run `python manage.py prepare_base_model`", file=sys.stderr)
            return 1
        version = ModelVersion(
            pk=0, name=name, artifact_path=relpath, sha256=store.manifest_read(manifest.parent)["sha256"]
        )
    examples = held_out(args.csv, args.examples)
    results = [evaluate(version, q, examples, args.new_tokens) for q in ("none", "int8")]
    fp32, int8 = results
    same = sum(a == b for a, b in zip(fp32["texts"], int8["texts"], strict=True)) / len(examples)

    print(f"\n{version.name}: {len(examples)} held-out adidas products, greedy, {args.new_tokens} new tokens max\n")
    print(f"{'metric':18} {'fp32':>9} {'int8':>9} {'change':>8}")
    verdicts = []
    for key, label in (
        ("validation_loss", "validation loss"),
        ("perplexity", "perplexity"),
        ("rouge_l", "ROUGE-L F1"),
        ("mean_words", "mean words"),
        ("cut_off", "cut off share"),
    ):
        change = (int8[key] - fp32[key]) / fp32[key] if fp32[key] else 0.0
        print(f"{label:18} {fp32[key]:9.4f} {int8[key]:9.4f} {change:+8.2%}")
        if key in ("validation_loss", "perplexity", "rouge_l"):
            verdicts.append(abs(change) < TOLERANCE)
    print(f"{'same text as fp32':18} {'':9} {same:9.0%}")
    print(f"{'seconds':18} {fp32['seconds']:9.1f} {int8['seconds']:9.1f}")
    print(
        f"\nint8 within {TOLERANCE:.0%} of fp32 on loss, perplexity and ROUGE-L: {'PASS' if all(verdicts) else 'FAIL'}"
    )
    if args.json:
        args.json.write_text(json.dumps({"version": version.name, "results": results, "same_text": same}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
