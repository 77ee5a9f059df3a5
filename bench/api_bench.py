"""What clients pay for keys, limits and usage, and for speaking OpenAI's API.

    python bench/api_bench.py [--rounds 600] [--products 8] [--repeats 5] [--new-tokens 64] [--json PATH]

One gunicorn process at a time (``docker/gunicorn.conf.py``, 2 torch threads) on
a scratch database (PostgreSQL when one answers on 127.0.0.1:5432, else
SQLite) with the limits counted in Redis (127.0.0.1:6379, database 12, when it
answers; else the process's local memory). Anonymous generation is switched on
so that the same process answers both sides.

1. **overhead**: ``--rounds`` rounds, each one request without a key (no key
   lookup, no limits, no usage) and one with a key that has every limit set
   (the key looked up and its request counted in one Redis script, the token
   reservation in another and its settlement, the usage tally), in random
   order, each side on its own kept-alive connection. Routes: ``POST
   /api/generate`` (4-word prompt, ``max_new_tokens: 1``: every accounting step
   runs) and ``GET /api/models``, served by the 2-layer test model
   (tests/tiny_model.py), whose generation takes about a millisecond, so that
   its own variance does not hide the key's cost; then ``POST /api/generate``
   on SmolLM2 (``--rounds`` / 2 rounds), where an 80 ms generation varies by
   milliseconds from one request to the next (printed, not judged). Printed:
   each side's p50, their difference with a 95% bootstrap interval, and the
   median of the per-round differences. Target: the key adds < 2 ms at p50.
2. **openai** (SmolLM2): the first ``--products`` adidas products,
   ``--repeats`` times each with its own seed, through the native stream
   (``POST /api/generate``, ``stream: true``) and through the official
   ``openai`` client (``chat.completions.create(stream=True)``, the product in
   ``extra_body``), temperature 1, ``--new-tokens``, alternating which goes
   first, after one untimed request for the product (the engine keeps recent
   prompt openings: whichever side ran a product first would pay its whole
   prompt alone). Time to first token: from the call to the first chunk with
   text. Targets: the same text every time; the client's TTFT p50 within 10%
   of the native stream's.

A benchmark, not a test: it exits 0 whatever the numbers, and 1 only when it
cannot set up. Run it on an otherwise idle machine (about 7 minutes on 2 cores).
"""

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gunicorn_process import gunicorn_start  # noqa: E402
from train_bench import ADIDAS_CSV, ROOT, django_setup, examples_load  # noqa: E402

TARGET_OVERHEAD_MS = 2.0
TARGET_TTFT_RATIO = 1.10
BENCH_DB = "genapi_api_bench"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(host, port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _manage(env, *args, capture=False):
    run = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return run.stdout.strip() if capture else None


class Server:
    """``tiny``: a 2-layer test model (tests/tiny_model.py) instead of SmolLM2, so that a
    generation takes about a millisecond and its own variance does not hide the key's cost."""

    def __init__(self, scratch, *, tiny=False):
        scratch.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "genapi.settings.dev",
            "DEBUG": "false",
            "SECRET_KEY": "api-bench-only",
            "GENERATE_ALLOW_ANONYMOUS": "true",
            "INFERENCE_TORCH_THREADS": "2",
            "WEB_CONCURRENCY": "1",
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "LOG_LEVEL": "WARNING",
            "GENAPI_ADMIN_PASSWORD": "api-bench-only",
        }
        if _answers("127.0.0.1", 5432):
            subprocess.run(
                ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force", BENCH_DB], check=True
            )
            subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", BENCH_DB], check=True)
            self.env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}"
            self.database = "PostgreSQL"
        else:
            self.env["DATABASE_URL"] = f"sqlite:///{scratch / 'bench.sqlite3'}"
            self.database = "SQLite"
        if _answers("127.0.0.1", 6379):
            self.env["CACHE_URL"] = "redis://127.0.0.1:6379/12"
            subprocess.run(["redis-cli", "-n", "12", "flushdb"], check=True, stdout=subprocess.DEVNULL)
            self.cache = "Redis"
        else:
            self.cache = "local memory"
        if tiny:
            from tests.tiny_model import TINY_NAME, tiny_checkpoint_build

            checkpoint = tiny_checkpoint_build(scratch / "tiny-checkpoint")
            self.env.update(BASE_MODEL_SOURCE=str(checkpoint), BASE_MODEL_NAME=TINY_NAME,
                            MODEL_STORE=str(scratch / "models"))  # fmt: skip
        self.model = "the tiny test model" if tiny else "SmolLM2"
        _manage(self.env, "migrate", "--noinput")
        _manage(self.env, "prepare_base_model")
        _manage(self.env, "ensure_admin")
        # Limits far above what the bench sends, so that every limit is counted and none refuses.
        self.key = _manage(
            self.env, "apikey", "create", "--name", "api-bench", "--owner", "admin", "--scopes", "all",
            "--requests-per-minute", "1000000", "--tokens-per-minute", "100000000",
            "--daily-token-quota", "1000000000", capture=True,
        )  # fmt: skip
        self.process, self.log = gunicorn_start(self.env, scratch / "gunicorn.log", self.port, timeout=300)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


class Client:
    """One kept-alive connection, with or without the key."""

    def __init__(self, server, key=None):
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def timed(self, method, path, body=None):
        payload = None if body is None else json.dumps(body)
        started = time.perf_counter()
        self.connection.request(method, path, body=payload, headers=self.headers)
        response = self.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise SystemExit(f"{method} {path}: {response.status} {data[:300]!r}")
        return elapsed


GENERATE = ("POST", "/api/generate", {"prompt": "Describe a scarf.", "max_new_tokens": 1})
MODELS = ("GET", "/api/models", None)


def overhead(server, rounds, routes):
    plain, keyed = Client(server), Client(server, server.key)
    results = {}
    rng = random.Random(0)
    for name, (method, path, body) in routes.items():
        for client in (plain, keyed):  # warm-up: connections, the model, the key's cache entries
            for _ in range(10):
                client.timed(method, path, body)
        off, on, differences = [], [], []
        for _ in range(rounds):
            order = [(plain, off), (keyed, on)]
            rng.shuffle(order)
            times = {}
            for client, sink in order:
                times[id(sink)] = client.timed(method, path, body)
                sink.append(times[id(sink)])
            differences.append(times[id(on)] - times[id(off)])
        low, high = _bootstrap_interval(off, on, rng)
        results[name] = {
            "without_key_p50_ms": statistics.median(off) * 1000,
            "with_key_p50_ms": statistics.median(on) * 1000,
            "p50_difference_ms": (statistics.median(on) - statistics.median(off)) * 1000,
            "p50_difference_95_ms": [low * 1000, high * 1000],
            "median_round_difference_ms": statistics.median(differences) * 1000,
        }
    return results


def _bootstrap_interval(off, on, rng, draws=2000):
    """95% interval of the p50 difference, resampling rounds: how much of it is the noise of
    the requests themselves (a generation's time varies by milliseconds from one to the next)."""
    rounds = list(zip(off, on, strict=True))
    estimates = []
    for _ in range(draws):
        sample = [rounds[rng.randrange(len(rounds))] for _ in rounds]
        estimates.append(statistics.median(b for _, b in sample) - statistics.median(a for a, _ in sample))
    estimates.sort()
    return estimates[int(0.025 * draws)], estimates[int(0.975 * draws)]


def _native_stream(server, product, seed, new_tokens):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = {"product": product, "temperature": 1.0, "seed": seed, "max_new_tokens": new_tokens, "stream": True}
    started = time.perf_counter()
    connection.request(
        "POST", "/api/generate", body=json.dumps(body),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {server.key}"},
    )  # fmt: skip
    response = connection.getresponse()
    first, text, event = None, "", None
    while True:
        line = response.readline()
        if not line:
            break
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "chunk":
            piece = json.loads(line[6:])["text"]
            if piece and first is None:
                first = time.perf_counter() - started
            text += piece
    connection.close()
    return first, text


def _openai_stream(client, product, seed, new_tokens):
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model="active",
        messages=[],
        extra_body={"product": product},
        temperature=1.0,
        seed=seed,
        max_tokens=new_tokens,
        stream=True,
    )
    first, text = None, ""
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            if first is None:
                first = time.perf_counter() - started
            text += piece
    return first, text


def openai_compare(server, products, new_tokens, repeats):
    import openai

    client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0, timeout=300)
    _openai_stream(client, products[0], 0, 4)  # warm-up: the client's connection pool
    _native_stream(server, products[0], 0, 4)
    native, compat, same = [], [], []
    for index, product in enumerate(products * repeats):
        seed = 1000 + index
        # The engine keeps the keys and values of recent prompt openings: whichever side ran a
        # product first would pay its whole prompt and the other not. One untimed request puts
        # both on the same footing.
        _native_stream(server, product, seed, 1)
        runs = [("native", _native_stream, (server,)), ("openai", _openai_stream, (client,))]
        if index % 2:
            runs.reverse()
        results = {}
        for name, function, first_args in runs:
            results[name] = function(*first_args, product, seed, new_tokens)
        native.append(results["native"][0])
        compat.append(results["openai"][0])
        same.append(results["native"][1] == results["openai"][1] and bool(results["native"][1]))
    return {
        "native_ttft_p50_s": statistics.median(native),
        "openai_ttft_p50_s": statistics.median(compat),
        "ttft_ratio": statistics.median(compat) / statistics.median(native),
        "same_text": sum(same),
        "requests": len(same),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--products", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="streams per product and side, each its own seed")
    parser.add_argument("--csv", type=Path, default=ADIDAS_CSV)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        print(f"no reference data at {args.csv}", file=sys.stderr)
        return 1
    django_setup()  # the importer's mapping reads the products, as in the other benchmarks
    products = [attributes for attributes, _ in examples_load(args.csv, args.products)]
    scratch = Path(tempfile.mkdtemp(prefix="api-bench-"))
    costs = {}
    try:
        for tiny in (True, False):
            server = Server(scratch / ("tiny" if tiny else "base"), tiny=tiny)
            try:
                print(f"gunicorn, 1 process, 2 torch threads, {server.model}; database {server.database}, "
                      f"limits in {server.cache}")  # fmt: skip
                if tiny:
                    costs.update(overhead(server, args.rounds, {
                        "POST /api/generate, tiny model": GENERATE, "GET /api/models": MODELS,
                    }))  # fmt: skip
                else:
                    costs.update(overhead(server, args.rounds // 2, {"POST /api/generate, SmolLM2 (noisy)": GENERATE}))
                    compare = openai_compare(server, products, args.new_tokens, args.repeats)
            finally:
                server.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n1. What a key costs per request ({args.rounds} rounds, SmolLM2 {args.rounds // 2}; each side once "
          "per round, random order)")  # fmt: skip
    print(f"{'':36} {'no key p50':>11} {'key p50':>9} {'difference':>11} {'95% interval':>18} {'median of rounds':>17}")
    for name, row in costs.items():
        low, high = row["p50_difference_95_ms"]
        print(f"{name:36} {row['without_key_p50_ms']:9.2f}ms {row['with_key_p50_ms']:7.2f}ms "
              f"{row['p50_difference_ms']:+9.2f}ms {f'{low:+.2f} to {high:+.2f} ms':>18} "
              f"{row['median_round_difference_ms']:+15.2f}ms")  # fmt: skip
    # The verdict on the routes whose own time is short and steady (the SmolLM2 row: informative).
    worst = max(row["p50_difference_ms"] for name, row in costs.items() if "noisy" not in name)
    verdict = "PASS" if worst < TARGET_OVERHEAD_MS else "FAIL"
    print(f"auth, limits and usage add {worst:+.2f} ms at p50 ({verdict} < {TARGET_OVERHEAD_MS} ms)")
    print(f"\n2. The official openai client, streaming chat, against the native stream ({args.products} products x "
          f"{args.repeats} seeds, {args.new_tokens} new tokens, seeded sampling)")  # fmt: skip
    print(f"TTFT p50: native {compare['native_ttft_p50_s']:.3f} s, openai {compare['openai_ttft_p50_s']:.3f} s: "
          f"ratio {compare['ttft_ratio']:.3f} ({'PASS' if compare['ttft_ratio'] <= TARGET_TTFT_RATIO else 'FAIL'} "
          f"<= {TARGET_TTFT_RATIO})")  # fmt: skip
    print(f"same text: {compare['same_text']}/{compare['requests']} "
          f"({'PASS' if compare['same_text'] == compare['requests'] else 'FAIL'})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"overhead": costs, "openai": compare}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
