"""Training throughput: the project's LoRA job against a plain Hugging Face Trainer recipe.

    python bench/train_bench.py [--examples 64] [--batch-size 8] [--max-seq-length 256] [--warmup-steps 3]
                                [--rounds 2] [--threads N] [--order plain-first|project-first] [--json PATH]

Both sides fine-tune the prepared base checkpoint (``python manage.py
prepare_base_model``) with the same LoRA settings (Hyperparameters defaults),
batch size, maximum length, seed and torch thread count, on the same first N
examples of ``../shared/data/adidas_usa.csv``, one after the other in one
process, for one epoch each, ``--rounds`` times per side in ABBA order.

Examples: the rows mapped as the importer maps them (name, color,
category+breadcrumbs, selling_price, brand, description) and cleaned by the
importer's ``example_clean``; rows it would reject (no description, bad
price) and exact duplicates are skipped, then the first N are taken in file
order.

- project: ``finetuning.training.train`` (our prompt, loss on the description
  only, length-grouped batches). Wall time is ``TrainingResult.train_seconds``:
  the training loop, without model load or tokenising.
- plain: ``Trainer`` with ``DataCollatorForLanguageModeling(mlm=False)``
  (every batch padded to its longest), text built by the tokenizer's stock
  chat template from the user message of our prompt builder and the
  description, tokenised with truncation at the same maximum length. Wall
  time is ``trainer.train()``. On a GPU it trains in bf16, as the project does.

Tokens:

- real tokens: non-padding tokens fed to the model (attention mask sum);
  padding share: 1 - real / (batch rows x padded length), summed over batches.
- target tokens: the tokens of each description plus its end-of-turn marker
  that fit within the maximum length, i.e. the tokens the project trains on.
  The plain side counts the same thing for the same examples (its tokens
  after the stock template's assistant header, up to and including
  ``<|im_end|>``), although its loss also covers the prompt: "target tokens
  per second" compares the useful work done per second, like with like.

This is a benchmark, not a test: it exits 0 whatever the numbers, and 1 only
when it cannot set up.
"""

import argparse
import csv
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADIDAS_CSV = ROOT.parent / "shared" / "data" / "adidas_usa.csv"
# The column mapping of tests/finetuning/test_importing.py for this file.
ADIDAS_MAPPING = [
    "name=name",
    "color=color",
    "category=category+breadcrumbs",
    "price=selling_price",
    "brand=brand",
    "description=description",
]
TARGET_RATIO = 1.5
TARGET_PADDING = 0.10
SEED = 42


def django_setup():
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genapi.settings.dev")
    import django

    django.setup()


def base_dir_get():
    from django.conf import settings

    from finetuning import store

    base_dir = store.absolute(store.base_relpath(settings.BASE_MODEL_NAME))
    return base_dir if (base_dir / "model.safetensors").is_file() else None


def examples_load(path, count):
    """The first ``count`` examples the importer would make of ``path``, in file order."""
    from finetuning.services.examples import ExampleError, example_clean
    from finetuning.services.importing import mapping_parse, row_to_example

    mapping = mapping_parse(ADIDAS_MAPPING)
    examples, seen = [], set()
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            attributes, description, _ = row_to_example(row, mapping, {})
            try:
                fields = example_clean(attributes=attributes, description=description)
            except ExampleError:
                continue
            if fields["content_hash"] in seen:
                continue
            seen.add(fields["content_hash"])
            examples.append((fields["attributes"], fields["description"]))
            if len(examples) == count:
                break
    return examples


def _cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def project_run(base_dir, examples, *, batch_size, max_seq_length):
    from finetuning.hyperparameters import Hyperparameters
    from finetuning.prompts import training_pair
    from finetuning.training import train

    hp = Hyperparameters(method="lora", epochs=1, batch_size=batch_size, max_seq_length=max_seq_length, seed=SEED)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as output_dir:
        result = train(
            base_dir=base_dir,
            train_pairs=[training_pair(attributes, description) for attributes, description in examples],
            validation_pairs=[],
            hp=hp,
            output_dir=output_dir,
        )
    return {
        "examples": result.train_examples,
        "steps": result.steps,
        "wall_seconds": result.train_seconds,
        "real_tokens": result.real_tokens,
        "padded_tokens": result.padded_tokens,
        "target_tokens": result.target_tokens,
        "device": result.device,
        "precision": result.precision,
        "final_loss": result.final_train_loss,
    }


class CountingCollator:
    """Wraps a collator and counts the real and padded tokens of every batch it makes."""

    def __init__(self, collator):
        self.collator = collator
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, features):
        batch = self.collator(features)
        self.real_tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["attention_mask"].numel()
        return batch


def plain_encode(tokenizer, examples, max_seq_length):
    """Stock-template rows for the Trainer, and the target tokens they hold (see the docstring)."""
    from finetuning.prompts import IM_END, product_messages

    rows, target_tokens = [], 0
    for attributes, description in examples:
        user = {"role": "user", "content": product_messages(attributes)[1]["content"]}
        text = tokenizer.apply_chat_template([user, {"role": "assistant", "content": description}], tokenize=False)
        header = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(text, truncation=True, max_length=max_seq_length)
        header_length = len(tokenizer(header)["input_ids"])
        completion_length = len(tokenizer(description + IM_END, add_special_tokens=False)["input_ids"])
        target_tokens += max(0, min(completion_length, len(encoded["input_ids"]) - header_length))
        rows.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return rows, target_tokens


def plain_run(base_dir, examples, *, batch_size, max_seq_length):
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from finetuning.hyperparameters import Hyperparameters
    from finetuning.training import lora_config

    hp = Hyperparameters()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows, target_tokens = plain_encode(tokenizer, examples, max_seq_length)
    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, dtype=torch.float32)
    model = get_peft_model(model, lora_config(hp))
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    with tempfile.TemporaryDirectory(prefix="train-bench-") as output_dir:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=output_dir,
                per_device_train_batch_size=batch_size,
                num_train_epochs=1,
                learning_rate=hp.learning_rate,
                report_to=[],
                save_strategy="no",
                logging_strategy="no",
                use_cpu=not cuda,
                bf16=bf16,
                seed=SEED,
                dataloader_num_workers=0,
                disable_tqdm=True,
            ),
            train_dataset=Dataset.from_list(rows),
            data_collator=collator,
        )
        started = time.monotonic()
        output = trainer.train()
        _cuda_sync()
        wall_seconds = time.monotonic() - started
        steps = trainer.state.global_step
    del trainer, model
    return {
        "examples": len(rows),
        "steps": steps,
        "wall_seconds": wall_seconds,
        "real_tokens": collator.real_tokens,
        "padded_tokens": collator.padded_tokens,
        "target_tokens": target_tokens,
        "device": "cuda" if cuda else "cpu",
        "precision": "bf16" if bf16 else "fp32",
        "final_loss": output.training_loss,
    }


def warm_up(base_dir, *, batch_size, max_seq_length, steps):
    """Untimed forward and backward passes of the LoRA-wrapped model on random
    tokens, before either side runs. Measured here, the first training steps in
    a fresh process cost about three times the later ones (allocator and
    thread-pool start-up); without this, whichever side ran first paid for it
    and the ratio depended on the order."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetuning.hyperparameters import Hyperparameters
    from finetuning.training import lora_config

    hp = Hyperparameters()
    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, dtype=torch.float32)
    model = get_peft_model(model, lora_config(hp))
    generator = torch.Generator().manual_seed(SEED)
    for step in range(steps):
        length = max_seq_length // 2 + step * max_seq_length // (2 * max(steps, 1))
        tokens = torch.randint(0, model.config.vocab_size, (batch_size, length), generator=generator)
        model(input_ids=tokens, labels=tokens).loss.backward()
        model.zero_grad(set_to_none=True)
    del model


def _derive(side):
    seconds = side["wall_seconds"] or float("nan")
    side["real_tokens_per_second"] = side["real_tokens"] / seconds
    side["target_tokens_per_second"] = side["target_tokens"] / seconds
    side["padding_share"] = 1 - side["real_tokens"] / side["padded_tokens"] if side["padded_tokens"] else 0.0
    side["real_tokens_per_example"] = side["real_tokens"] / max(side["examples"] * side.get("runs", 1), 1)
    return side


def report(sides, ratio):
    header = (
        f"{'side':<8} {'examples':>8} {'steps':>5} {'wall s*':>8} {'real tok/s':>10} {'target tok/s':>12} "
        f"{'padding':>8} {'real tok/ex':>11}  device"
    )
    print(header)
    print("-" * len(header))
    for name, side in sides.items():
        print(
            f"{name:<8} {side['examples']:>8} {side['steps']:>5} {side['wall_seconds']:>8.2f} "
            f"{side['real_tokens_per_second']:>10.1f} {side['target_tokens_per_second']:>12.1f} "
            f"{side['padding_share']:>7.1%} {side['real_tokens_per_example']:>11.1f}  "
            f"{side['device']}/{side['precision']}"
        )
    for name, side in sides.items():
        print(f"* {name}: summed over runs of {', '.join(f'{seconds:.1f}' for seconds in side['run_seconds'])} s")
    print(f"ratio project/plain, target tokens per second: {ratio:.2f}x")
    padding = sides["project"]["padding_share"]
    print(f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}: speed-up {ratio:.2f}x (target >= {TARGET_RATIO}x)")
    print(
        f"{'PASS' if padding < TARGET_PADDING else 'FAIL'}: project padding {padding:.1%} "
        f"(target < {TARGET_PADDING:.0%})"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--order", choices=("plain-first", "project-first"), default="plain-first")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating which goes first")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed passes before either side (0: none)")
    parser.add_argument("--csv", type=Path, default=ADIDAS_CSV)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    django_setup()
    base_dir = base_dir_get()
    if base_dir is None:
        print("no prepared base model: run `python manage.py prepare_base_model` first", file=sys.stderr)
        return 1
    if not args.csv.is_file():
        print(f"reference data not found at {args.csv}", file=sys.stderr)
        return 1
    examples = examples_load(args.csv, args.examples)
    if not examples:
        print(f"no usable examples in {args.csv}", file=sys.stderr)
        return 1

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{len(examples)} examples, batch size {args.batch_size}, max length {args.max_seq_length}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.order}",
        flush=True,
    )

    if args.warmup_steps:
        print(f"warming up: {args.warmup_steps} untimed passes ...", flush=True)
        warm_up(base_dir, batch_size=args.batch_size, max_seq_length=args.max_seq_length, steps=args.warmup_steps)
        _free()
    runs = {"project": project_run, "plain": plain_run}
    first = ("plain", "project") if args.order == "plain-first" else ("project", "plain")
    # ABBA...: each side runs first as often as second, so drift in the
    # machine's speed during the run falls on both alike.
    schedule = [name for r in range(args.rounds) for name in (first if r % 2 == 0 else first[::-1])]
    results = {"project": [], "plain": []}
    for name in schedule:
        print(f"training: {name} (run {len(results[name]) + 1} of {args.rounds}) ...", flush=True)
        result = runs[name](base_dir, examples, batch_size=args.batch_size, max_seq_length=args.max_seq_length)
        print(f"  {name}: {result['wall_seconds']:.1f} s for {result['steps']} steps", flush=True)
        results[name].append(result)
        _free()
    sides = {}
    for name, side_runs in results.items():
        side = dict(side_runs[0])
        # Every run does the same work: rates come from times and tokens summed
        # over the runs; examples and steps are those of one run.
        for key in ("wall_seconds", "real_tokens", "padded_tokens", "target_tokens"):
            side[key] = sum(run[key] for run in side_runs)
        side["runs"] = len(side_runs)
        side["run_seconds"] = [round(run["wall_seconds"], 2) for run in side_runs]
        sides[name] = _derive(side)
    ratio = sides["project"]["target_tokens_per_second"] / sides["plain"]["target_tokens_per_second"]
    report(sides, ratio)

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {
                        "examples": len(examples),
                        "batch_size": args.batch_size,
                        "max_seq_length": args.max_seq_length,
                        "threads": torch.get_num_threads(),
                        "order": args.order,
                        "warmup_steps": args.warmup_steps,
                        "rounds": args.rounds,
                        "torch": torch.__version__,
                    },
                    "sides": sides,
                    "ratio": ratio,
                    "pass": {
                        "ratio": ratio >= TARGET_RATIO,
                        "padding": sides["project"]["padding_share"] < TARGET_PADDING,
                    },
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
