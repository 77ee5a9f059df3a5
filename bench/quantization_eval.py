"""Do the serving modes keep the quality of plain fp32? The evaluation metrics, side by side.

    python bench/quantization_eval.py --version NAME|active|base [--mode blocks|int8] [--split-of VERSION]
        [--file F --map TARGET=COLUMN ...] [--limit N] [--max-new-tokens N] [--max-batch N] [--json PATH]

Runs ``python manage.py evaluate`` twice on the same examples and weights, in this
process: once on plain fp32 weights (``INFERENCE_PACK_WEIGHTS=false``,
``INFERENCE_QUANTIZE=none``: the reference) and once in ``--mode``:

- ``blocks`` (the default serving mode): the weights that are lossless GGUF blocks
  (the base model's Q4_1 layers and Q8_0 embedding) kept as blocks and expanded to
  the same floats by the native kernels; only the order of the sums differs.
- ``int8``: fp32 weights with int8 drafts, each checked on the fp32 weights, which
  choose every token given out (the mode for weights that are not blocks).

It prints every metric of both with its relative change. The examples are those the
command picks: by default the validation split the version was trained with
(``--split-of`` another version's, or ``--file``), at most ``--limit``.
``--max-batch 1`` generates one sequence at a time: the reference then takes exactly
``generate``'s path, and int8 drafts every token (it drafts only while at most two
sequences run).

A mode passes when every quality metric (those with a better direction: loss,
perplexity, ROUGE-L, chrF, BLEU, coverage, repetition, cut-off and format shares) is
within 1% of its fp32 value. A share of 40 outputs moves in steps of 2.5%, so for
shares this means the same count.

This is an evaluation, not a test: it exits 0 whatever the numbers, 1 when it
cannot run.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import django_setup  # noqa: E402

TOLERANCE = 0.01


MODES = {  # name: the settings it serves with
    "fp32": {"INFERENCE_PACK_WEIGHTS": False, "INFERENCE_QUANTIZE": "none"},
    "blocks": {"INFERENCE_PACK_WEIGHTS": True, "INFERENCE_QUANTIZE": "none"},
    "int8": {"INFERENCE_PACK_WEIGHTS": False, "INFERENCE_QUANTIZE": "int8"},
}


def evaluate(mode, arguments, directory, max_batch):
    """The evaluate command's JSON for ``arguments`` served in ``mode`` (and with
    INFERENCE_MAX_BATCH=``max_batch``, unless None)."""
    from django.core.management import call_command
    from django.test import override_settings

    from inference import loader

    path = Path(directory) / f"{mode}.json"
    loader.cache_clear(wait=30)  # weights are cached per artifact, not per setting
    batch = {} if max_batch is None else {"INFERENCE_MAX_BATCH": max_batch}
    with override_settings(**MODES[mode], **batch):
        call_command("evaluate", *arguments, "--json", str(path))
    loader.cache_clear(wait=30)
    return json.loads(path.read_text())


def change(fp32, int8):
    if fp32 == int8:
        return 0.0
    return (int8 - fp32) / abs(fp32) if fp32 else float("inf")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="base")
    parser.add_argument("--mode", choices=("blocks", "int8"), default="blocks", help="the mode compared with fp32")
    parser.add_argument("--split-of")
    parser.add_argument("--file")
    parser.add_argument("--map", action="append", default=[])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument(
        "--max-batch", type=int, help="sequences generated at once (default INFERENCE_MAX_BATCH); 1: one at a time"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    django_setup()
    from django.core.management.base import CommandError

    from finetuning.metrics import METRICS, metric_format

    arguments = ["--version", args.version]
    for flag in ("split_of", "file", "limit", "max_new_tokens"):
        if getattr(args, flag) is not None:
            arguments += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for item in args.map:
        arguments += ["--map", item]
    for item in args.set:
        arguments += ["--set", item]
    with tempfile.TemporaryDirectory() as directory:
        try:
            fp32, other = (evaluate(mode, arguments, directory, args.max_batch) for mode in ("fp32", args.mode))
        except CommandError as exc:
            print(f"quantization_eval: {exc}", file=sys.stderr)
            return 1

    texts = [(a["text"], b["text"]) for a, b in zip(fp32["examples"], other["examples"], strict=True)]
    same = sum(a == b for a, b in texts) / len(texts)
    print(f"\n{fp32['version']['name']} on {fp32['source']}: {len(texts)} examples, {fp32['decoding']}\n")
    print(f"{'metric':34} {'fp32':>10} {args.mode:>10} {'change':>9}")
    failed = []
    for key, metric in METRICS.items():
        a, b = fp32["metrics"].get(key), other["metrics"].get(key)
        if a is None or b is None:
            continue
        moved = change(a, b)
        verdict = ""
        if metric.better:
            verdict = "ok" if abs(moved) <= TOLERANCE else "MOVED"
            if verdict != "ok":
                failed.append(metric.label)
        print(f"{metric.label:34} {metric_format(key, a):>10} {metric_format(key, b):>10} {moved:+9.2%}  {verdict}")
    print(f"{'same text as fp32':34} {'':>10} {same:>10.0%}")
    verdict = "PASS" if not failed else f"FAIL (moved more: {', '.join(failed)})"
    print(f"\n{args.mode} within {TOLERANCE:.0%} of fp32 on every quality metric: {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"fp32": fp32, args.mode: other, "same_text": same}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
