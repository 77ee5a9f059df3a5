"""A running stream while long prompts arrive: chunked prefill against prefill in one pass.

    python bench/prefill_bench.py [--quantize none] [--stream-tokens 128] [--long-tokens 1000]
                                  [--long-prompts 3] [--threads 2] [--json PATH]

All in this process, at the engine (inference/engine/), no HTTP, on the
prepared SmolLM2 base (``python manage.py prepare_base_model``), greedy. The
stream is the prompt builder on the first adidas product of
``../shared/data/adidas_usa.csv``, held to exactly ``--stream-tokens`` new
tokens (the engine here has no stop tokens, so it never ends early). Each long
prompt is a free prompt asking to summarise adidas descriptions (each its own
products), cut to ``--long-tokens`` tokens; each asks for 8 new tokens.

Runs, in this order, each on a fresh engine over the same weights:

1. **alone**: the stream alone (run again after 2 and 3; the figures for alone
   are the mean of the two runs, so that a drift in the machine's speed weighs
   on both sides alike).
2. **chunked** (the engine's defaults): the stream, and ``--long-prompts``
   long prompts submitted once it has given 8 tokens.
3. **one pass** (``prefill_chunk`` larger than any prompt: every prompt runs
   whole as it is admitted, which is what the engine did before chunking): the
   same.
4. One long prompt alone, chunked and in one pass: its time to first token.

For the stream: its longest gap between two chunks (seconds between their
arrivals at the reader), its tokens/s from its first token to its end, and its
tokens/s while the long prompts were prefilling (from their submission to the
last one's first token, or to the stream's end if sooner), each as a ratio to
the stream alone; and prefill's share in that span: the prefill passes'
seconds over the rest (what ``prefill_share`` bounds; unlike the ratios, a
busy machine does not move it much). For the long prompts: time to first
token (from submission), and the prefill passes the engine ran for them.
Targets: longest gap < 1.5 s, tokens/s during the long prompts' prefill >=
70% of alone; the greedy texts must be the same in every row.

A benchmark, not a test: it exits 0 whatever the numbers, and 1 only when it
cannot set up. Run it on an otherwise idle machine: another process on these
cores shows up as gaps. About 3 minutes on 2 CPU cores.
"""

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import ADIDAS_CSV, base_dir_get, django_setup, examples_load  # noqa: E402

TARGET_GAP_S = 1.5
TARGET_RATE = 0.7  # the stream's tokens/s during the long prompts' prefill, over alone
LONG_NEW_TOKENS = 8
START_AFTER_TOKENS = 8  # the long prompts arrive once the stream has given this many


class Stream:
    """Reads a generation's events in a thread, noting when each chunk arrives and how many tokens
    the sequence had then."""

    def __init__(self, generation):
        self.generation = generation
        self.arrivals = []  # (time.monotonic(), tokens so far)
        self.completion = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        sequence = self.generation.sequences[0]
        for kind, _, payload in self.generation:
            if kind == "chunk":
                self.arrivals.append((time.monotonic(), len(sequence.tokens)))
            else:
                self.completion = payload

    def wait(self):
        self.thread.join()
        return self

    def longest_gap(self):
        times = [t for t, _ in self.arrivals]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def rate(self, start=None, end=None):
        """Tokens/s from ``start`` to ``end`` (default: its first token to its end)."""
        start = self.generation.first_token_at if start is None else start
        end = self.completion.finished_at if end is None else end
        before = max((n for t, n in self.arrivals if t <= start), default=1)
        until = max((n for t, n in self.arrivals if t <= end), default=before)
        if end >= self.completion.finished_at:
            until = self.completion.tokens
        return (until - before) / (end - start)


def engine_make(decoder, tokenizer, **options):
    from inference.engine import Engine

    engine = Engine(decoder, tokenizer, stop_token_ids=(), max_batch=8, max_queue=32, max_tokens=2048, **options)
    passes = []  # (tokens, seconds, time.monotonic() at its end) of every prefill pass
    prefill = engine._prefill

    def counted(slot, sequence, count):
        seconds = prefill(slot, sequence, count)
        passes.append((count, seconds, time.monotonic()))
        return seconds

    engine._prefill = counted
    return engine, passes


def submit(engine, ids, new_tokens):
    from inference.engine import GenerationParams

    return engine.submit(prompt_ids=ids, sampling=GenerationParams(), max_new_tokens=new_tokens, timeout=3600)


def long_alone(decoder, tokenizer, ids, **options):
    engine, passes = engine_make(decoder, tokenizer, **options)
    generation = submit(engine, ids, LONG_NEW_TOKENS)
    done = Stream(generation).wait()
    engine.close(wait=10)
    return {"ttft_s": generation.first_token_at - generation.submitted_at, "text": done.completion.text,
            "passes": len(passes)}  # fmt: skip


def run(decoder, tokenizer, stream_ids, long_ids, stream_tokens, **options):
    """The stream, alone (``long_ids`` empty) or with the long prompts arriving while it runs."""
    engine, passes = engine_make(decoder, tokenizer, **options)
    stream = Stream(submit(engine, stream_ids, stream_tokens))
    longs = []
    if long_ids:
        while len(stream.generation.sequences[0].tokens) < START_AFTER_TOKENS:
            time.sleep(0.001)
        passes.clear()  # the stream's own prompt
        longs = [Stream(submit(engine, ids, LONG_NEW_TOKENS)) for ids in long_ids]
    stream.wait()
    for long in longs:
        long.wait()
    engine.close(wait=10)
    result = {
        "gap_s": stream.longest_gap(),
        "tok_s": stream.rate(),
        "text": stream.completion.text,
        "tokens": stream.completion.tokens,
    }
    if longs:
        arrived = longs[0].generation.submitted_at
        prefilled = max(long.generation.first_token_at for long in longs)
        end = min(prefilled, stream.completion.finished_at)
        spent = sum(seconds for _, seconds, ended in passes if ended <= end)
        result.update(
            during_tok_s=stream.rate(arrived, end),
            during_s=end - arrived,
            ttft_s=[long.generation.first_token_at - long.generation.submitted_at for long in longs],
            long_texts=[long.completion.text for long in longs],
            passes=len(passes),
            pass_tokens=[count for count, _, _ in passes],
            pass_max_s=max(seconds for _, seconds, _ in passes),
            # Prefill's time in that span over the rest (the decode steps'): what prefill_share bounds.
            share=spent / (end - arrived - spent),
        )
    return result


def long_prompts(tokenizer, count, length):
    """``count`` chat prompts of about ``length`` tokens, each summarising its own adidas descriptions
    (cut to fit)."""
    from finetuning import prompts

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ask = "Summarise what these product descriptions have in common:\n"
    room = length - len(ids(prompts.free_prompt(ask)))
    examples = examples_load(ADIDAS_CSV, 60 * count)
    result = []
    for index in range(count):
        descriptions = ids("\n".join(description for _, description in examples[index::count]))
        if len(descriptions) < room:
            raise SystemExit(f"the descriptions make {len(descriptions)} tokens, fewer than {room}")
        result.append(ids(prompts.free_prompt(ask + tokenizer.decode(descriptions[:room]))))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--long-tokens", type=int, default=1000)
    parser.add_argument("--long-prompts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    django_setup()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetuning import prompts
    from inference.engine import PREFILL_SHARE, DecoderWeights

    base_dir = base_dir_get()
    if base_dir is None:
        print("the base model is not prepared: run `python manage.py prepare_base_model`", file=sys.stderr)
        return 1
    if not ADIDAS_CSV.is_file():
        print(f"no reference data at {ADIDAS_CSV}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, dtype=torch.float32).eval()
    decoder = DecoderWeights(model, quantize=args.quantize)
    del model
    [(product, _)] = examples_load(ADIDAS_CSV, 1)
    stream_ids = tokenizer(prompts.product_prompt(product), add_special_tokens=False)["input_ids"]
    longs = long_prompts(tokenizer, args.long_prompts, args.long_tokens)
    one_pass = {"prefill_chunk": 1 << 20}

    run(decoder, tokenizer, stream_ids, [], 16)  # warm-up, untimed
    before = run(decoder, tokenizer, stream_ids, [], args.stream_tokens)
    rows = {
        "chunked": run(decoder, tokenizer, stream_ids, longs, args.stream_tokens),
        "one pass": run(decoder, tokenizer, stream_ids, longs, args.stream_tokens, **one_pass),
    }
    after = run(decoder, tokenizer, stream_ids, [], args.stream_tokens)
    # Alone before and after the others, so that a machine whose speed drifts weighs on both sides alike.
    alone = {key: (before[key] + after[key]) / 2 for key in ("gap_s", "tok_s")}
    alone["text"] = before["text"] if before["text"] == after["text"] else None
    long_chunked = long_alone(decoder, tokenizer, longs[0])
    long_one_pass = long_alone(decoder, tokenizer, longs[0], **one_pass)

    print(f"\nSmolLM2-135M {args.quantize}, {args.threads} torch threads; a {len(stream_ids)}-token prompt streaming "
          f"{args.stream_tokens} tokens, {args.long_prompts} prompts of {args.long_tokens} tokens arriving after "
          f"its {START_AFTER_TOKENS}th token; prefill_share {PREFILL_SHARE}\n")  # fmt: skip
    print(f"stream alone: {alone['tok_s']:.1f} tokens/s (before {before['tok_s']:.1f}, after {after['tok_s']:.1f}), "
          f"longest gap {alone['gap_s']:.3f} s")  # fmt: skip
    print(f"{'':10} {'gap s':>7} {'x alone':>8} {'tok/s':>7} {'x alone':>8} {'during':>7} {'x alone':>8} "
          f"{'over s':>7} {'share':>6}  long prompts' TTFT s   prefill passes")  # fmt: skip
    checks = []
    for name, row in rows.items():
        ttft = " ".join(f"{t:6.1f}" for t in row["ttft_s"])
        sizes = row["pass_tokens"]
        print(f"{name:10} {row['gap_s']:7.3f} {row['gap_s'] / alone['gap_s']:8.2f} {row['tok_s']:7.1f} "
              f"{row['tok_s'] / alone['tok_s']:8.2f} {row['during_tok_s']:7.1f} "
              f"{row['during_tok_s'] / alone['tok_s']:8.2f} {row['during_s']:7.1f} {row['share']:6.2f}  {ttft:22} "
              f"{len(sizes)} of {min(sizes)}-{max(sizes)} tokens, longest {row['pass_max_s']:.2f} s")  # fmt: skip
    print("\n'during': the stream's tokens/s from the long prompts' arrival to the last one's first token (or "
          "the stream's end), 'over s' that span, 'share' prefill's seconds in it over the rest's.")  # fmt: skip
    print(f"one long prompt alone, time to first token: chunked {long_chunked['ttft_s']:.2f} s "
          f"({long_chunked['passes']} passes), one pass {long_one_pass['ttft_s']:.2f} s\n")  # fmt: skip
    chunked = rows["chunked"]
    checks.append(f"chunked: stream's longest gap {chunked['gap_s']:.2f} s "
                  f"({'PASS' if chunked['gap_s'] < TARGET_GAP_S else 'FAIL'} < {TARGET_GAP_S} s)")  # fmt: skip
    rate = chunked["during_tok_s"] / alone["tok_s"]
    checks.append(f"chunked: stream's tokens/s during the long prompts' prefill {rate:.0%} of alone "
                  f"({'PASS' if rate >= TARGET_RATE else 'FAIL'} >= {TARGET_RATE:.0%}); over its whole run "
                  f"{chunked['tok_s'] / alone['tok_s']:.0%}")  # fmt: skip
    same_stream = all(row["text"] == alone["text"] for row in rows.values())
    same_long = (
        chunked["long_texts"] == rows["one pass"]["long_texts"] and long_chunked["text"] == long_one_pass["text"]
    )
    checks.append(f"greedy text: stream the same in every row {'PASS' if same_stream else 'FAIL'}; "
                  f"long prompts chunked == one pass {'PASS' if same_long else 'FAIL'}")  # fmt: skip
    for line in checks:
        print(line)
    if args.json:
        results = {
            "alone": alone,
            "alone before": before,
            "alone after": after,
            **rows,
            "long_alone": {"chunked": long_chunked, "one pass": long_one_pass},
        }
        args.json.write_text(json.dumps({"results": results, "checks": checks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
