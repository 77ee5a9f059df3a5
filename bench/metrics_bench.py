"""What a Prometheus scrape of GET /metrics costs on a well-used deployment.

    python bench/metrics_bench.py [--versions 100] [--generations 10000] [--processes 4] [--scrapes 50]

On a scratch database (PostgreSQL when one answers on 127.0.0.1:5432, else SQLite), migrated
here and dropped at the end: ``--versions`` model versions, ``--generations`` logged
generations spread over them, and a few dozen jobs and evaluations in every state. Metrics in
prometheus-client's multiprocess mode, as under gunicorn (docker/gunicorn.conf.py): ``--processes``
forked processes each record what a long-lived web worker would have (tokens for every version,
every route answering with several statuses, engine gauges, model loads, first-token times) and
leave their files behind. Then ``--scrapes`` GET /metrics through Django's whole stack
(middleware, the view, the database collector), after a few untimed ones.

Printed: the median and p95 of a scrape, the database collector's share, the size of the answer
and its number of series. Target: a median under 50 ms.

A benchmark, not a test: it exits 0 whatever the numbers, and 1 only when it cannot set up.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "genapi_metrics_bench"
# Routes a web worker answers in a day, as the URL patterns name them, and their statuses.
ROUTES = [
    ("api/generate", "POST", ("200", "400", "401", "429", "503")),
    ("v1/chat/completions", "POST", ("200", "400", "401", "429")),
    ("v1/completions", "POST", ("200", "400")),
    ("v1/models", "GET", ("200", "401")),
    ("api/models", "GET", ("200", "401")),
    ("api/usage", "GET", ("200",)),
    ("api/health", "GET", ("200",)),
    ("api/ready", "GET", ("200", "503")),
    ("api/jobs", "GET", ("200", "401")),
    ("api/jobs", "POST", ("201", "400", "409")),
    ("api/jobs/<int:pk>", "GET", ("200", "404")),
    ("metrics", "GET", ("200",)),
    ("^(?:api|v1)/", "GET", ("404",)),
    ("unmatched", "GET", ("404",)),
    ("static", "GET", ("200", "304")),
] + [(f"admin/finetuning/{model}/", "GET", ("200", "302")) for model in ("trainingexample", "finetuningjob", "modelversion", "evaluation", "dataset", "generation")]  # fmt: skip


def _answers(host, port):
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _record(versions, seed):
    """What one web worker records over its life."""
    import random

    from inference import telemetry

    rng = random.Random(seed)
    for name in versions:
        telemetry.tokens_count(name, rng.randint(1, 5000))
    for route, method, statuses in ROUTES:
        for status in statuses:
            for _ in range(3):
                telemetry.http_observe(route=route, method=method, status=status, seconds=rng.expovariate(5))
    for _ in range(200):
        telemetry.first_token_observe(rng.expovariate(4))
    for engine in ("base-SmolLM2-135M-Instruct", "versions-full-7", "versions-full-9"):
        telemetry.engine_load_set(engine, running=rng.randint(0, 8), waiting=rng.randint(0, 32))
    for _ in range(3):
        with telemetry.model_load_observed():
            pass


def _rows(versions, generations):
    from django.db import transaction

    from finetuning.models import Dataset, Evaluation, FineTuningJob, ModelVersion
    from inference.models import Generation

    with transaction.atomic():
        made = ModelVersion.objects.bulk_create(
            ModelVersion(
                name=f"bench-v{i}", kind="lora", base_model="SmolLM2-135M-Instruct",
                artifact_path=f"versions/bench-v{i}", sha256=f"{i:064x}", prompt_format_version=1,
            )
            for i in range(versions)
        )  # fmt: skip
        Generation.objects.bulk_create(
            (
                Generation(
                    route="api", version=made[i % versions], version_name=made[i % versions].name,
                    input={"prompt": f"bench {i}"}, prompt=f"bench {i}", output="A fine product.",
                    prompt_tokens=90, completion_tokens=60, total_ms=800.0,
                )
                for i in range(generations)
            ),
            batch_size=2000,
        )  # fmt: skip
        # One job per dataset may be active: every state, finished ones many times over.
        states = ["queued", "running"] + ["succeeded", "failed", "cancelled"] * 10
        for i, state in enumerate(states):
            dataset = Dataset.objects.create(name=f"bench-{i}")
            FineTuningJob.objects.create(dataset=dataset, base_model="SmolLM2-135M-Instruct", status=state, step=i)
        for i, state in enumerate(states):
            Evaluation.objects.create(version=made[i % versions], status=state)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--generations", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="metrics-bench-"))
    postgres = _answers("127.0.0.1", 5432)
    # Before anything imports prometheus-client (Django's logging set-up does): it picks its mode then.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(scratch / "prometheus")
    (scratch / "prometheus").mkdir()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="genapi.settings.test",
        GENAPI_VAR_DIR=str(scratch / "var"),
        LOG_LEVEL="WARNING",
        DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}"
        if postgres
        else f"sqlite:///{scratch / 'bench.sqlite3'}",
    )
    dropdb = ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force", BENCH_DB]
    try:
        if postgres:
            subprocess.run(dropdb, check=True)
            subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", BENCH_DB], check=True)
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connection
        from django.test import Client
        from django.test.utils import setup_test_environment

        setup_test_environment()  # the test client's host name is allowed
        call_command("migrate", verbosity=0)
        started = time.perf_counter()
        _rows(args.versions, args.generations)
        print(
            f"database: {'PostgreSQL' if postgres else 'SQLite'}, {args.versions} versions, "
            f"{args.generations} generations, 32 jobs and 32 evaluations ({time.perf_counter() - started:.1f} s)"
        )
        names = [f"bench-v{i}" for i in range(args.versions)]
        connection.close()  # not shared with the forked processes
        for index in range(args.processes):
            pid = os.fork()
            if pid == 0:
                try:
                    _record(names, seed=index)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        _record(names, seed=args.processes)

        from inference.telemetry import WorkCollector

        client = Client()
        for _ in range(3):
            assert client.get("/metrics").status_code == 200
        scrapes, collector = [], []
        for _ in range(args.scrapes):
            started = time.perf_counter()
            response = client.get("/metrics")
            scrapes.append(time.perf_counter() - started)
            started = time.perf_counter()
            list(WorkCollector().collect())
            collector.append(time.perf_counter() - started)
        body = response.content.decode()
        series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
        ms = sorted(s * 1000 for s in scrapes)
        print(
            f"{args.processes + 1} processes' files; answer: {len(body) / 1024:.0f} KB, {series} series; "
            f"{args.scrapes} scrapes"
        )
        print(
            f"scrape: median {statistics.median(ms):.1f} ms, p95 {ms[int(len(ms) * 0.95) - 1]:.1f} ms, "
            f"max {ms[-1]:.1f} ms; of which the database collector: median "
            f"{statistics.median(collector) * 1000:.1f} ms (target: median < 50 ms)"
        )
        connection.close()
    except Exception as exc:
        print(f"metrics_bench: cannot set up: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    finally:
        if postgres:
            subprocess.run(dropdb, check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
