"""Load, slow clients, long prompts, a database outage and a Redis restart, as a deployment
meets them, with a figure printed for each.

    python bench/fault_bench.py [--phases load,slow,prefill,database,redis] [--load-seconds 60] [--json PATH]

The deployment of docker/compose.yml on loopback, with nothing shared with the machine's
services: its own PostgreSQL cluster (initdb, a free port) and Redis (a free port), gunicorn
with docker/gunicorn.conf.py and the production settings, and nginx with
docker/nginx/genapi.conf in front (HTTPS, a self-signed certificate made for the run). The
model is SmolLM2-135M-Instruct (the Q4_1 GGUF dequantised to fp32), prepared once into
var/bench-models. Clients speak HTTPS to nginx unless a phase says otherwise.

1. **load**: 64 clients at once for ``--load-seconds``, each sending 8-token generations
   (product prompts) back to back with one key whose limits are far above the load; the
   engine's queue is the limit. Target: 0 x 5xx other than 503; every 429/503 carries
   Retry-After; /api/health p99 < 1 s throughout (polled every 0.2 s).
2. **slow**: 60 clients that send their headers, then one body byte a second, for 25 s;
   meanwhile /api/health every 0.2 s and a normal generation every second. Through nginx,
   and for comparison straight at gunicorn (what compose did before). Target through nginx:
   health p99 < 1 s and every generation answered.
3. **prefill**: a stream of 160 new tokens alone, then the same stream (same seed, same
   text) with three ~1,000-token prompts sent just after its first chunk. Printed: the
   stream's longest gap between chunks, its tokens/s while the long prompts were being
   prefilled and over its whole run, each against running alone. Targets: longest gap
   < 1.5 s; tokens/s within 30% of alone.
4. **database**: 8 clients generating and one reading /api/models (which needs the
   database) while PostgreSQL is stopped for 30 s and started again. Targets: no
   generation fails (the loaded active version goes on), /api/models answers 503 with
   Retry-After meanwhile and never 500, and both /api/models and /api/ready answer 200
   within 10 s of the database being back.
5. **redis**: a job started (POST /api/jobs) while no training worker runs; Redis is
   restarted without its data (the task is gone); then a training worker and the scheduler
   start. Target: the job ends succeeded (sent again) or failed with a reason, never queued
   for good. Printed: the seconds from the workers' start to the job's end.

A benchmark, not a test: it exits 0 whatever the numbers, 1 when it cannot set up. Run it on
an otherwise idle machine (about 8 minutes on 2 cores; needs nginx, redis-server, the
PostgreSQL server binaries and openssl).
"""

import argparse
import glob
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import ADIDAS_CSV, ROOT, django_setup, examples_load  # noqa: E402

PHASES = ("load", "slow", "prefill", "database", "redis")
KEY_LIMITS = ["--requests-per-minute", "1000000", "--tokens-per-minute", "100000000"]
_TLS = ssl._create_unverified_context()  # the run's own self-signed certificate


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


def _percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- The deployment ------------------------------------------------------------------


class Postgres:
    """A throwaway cluster: stopping it stops nobody else's database."""

    def __init__(self, scratch):
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.data = scratch / "pg"
        self.port = _free_port()
        self.log = scratch / "postgres.log"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        scratch.mkdir()
        if self.as_postgres:  # initdb refuses to run as root
            shutil.chown(scratch, "postgres")
        subprocess.run([*self.as_postgres, self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)  # fmt: skip
        self.start()
        subprocess.run([self.bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "genapi"],
                       check=True)  # fmt: skip
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/genapi"

    def _ctl(self, *args):
        subprocess.run([*self.as_postgres, self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w", *args],
                       check=True, capture_output=True)  # fmt: skip

    def start(self):
        self._ctl("-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}", "start")

    def stop(self):
        self._ctl("-m", "fast", "stop")


class Redis:
    def __init__(self, scratch):
        self.port = _free_port()
        self.scratch = scratch
        self.process = None
        self.start()

    def start(self):
        """Without persistence: a restart loses everything, as the issue's Redis did."""
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.scratch)], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        _wait(lambda: _answers(self.port), 10, "redis-server start")

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def _answers(port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Deployment:
    def __init__(self, scratch):
        self.scratch = scratch
        self.postgres = Postgres(scratch / "db")
        self.redis = Redis(scratch)
        self.web_port, self.http_port, self.https_port = _free_port(), _free_port(), _free_port()
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "genapi.settings.production",
            "SECRET_KEY": "fault-bench-only-" + "x" * 40,
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DATABASE_URL": self.postgres.url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{self.redis.port}/0",
            "CACHE_URL": f"redis://127.0.0.1:{self.redis.port}/1",
            "TRUSTED_PROXIES": "127.0.0.1",
            "MODEL_STORE": str(ROOT / "var" / "bench-models"),
            "GENAPI_VAR_DIR": str(scratch / "var"),
            "INFERENCE_NATIVE_DIR": str(ROOT / "var" / "native"),
            "INFERENCE_TORCH_THREADS": "2",
            "TRAINING_TORCH_THREADS": "2",
            "WEB_CONCURRENCY": "1",
            "GUNICORN_BIND": f"127.0.0.1:{self.web_port}",
            "GENAPI_ADMIN_PASSWORD": "fault-bench-only",
            # Room for the prefill phase's 1,000-token prompts.
            "GENERATE_MAX_PROMPT_CHARS": "8000",
            # The redis phase: a queued job whose task is lost is sent again within seconds.
            "JOB_QUEUED_RECHECK_SECONDS": "10",
            "JOB_STALE_CHECK_SECONDS": "5",
        }
        for args in (["migrate", "--noinput"], ["prepare_base_model"], ["ensure_admin"], ["load_examples"]):
            self.manage(*args)
        self.key = self.manage("apikey", "create", "--name", "fault-bench", "--owner", "admin", "--scopes", "all",
                               *KEY_LIMITS, capture=True)  # fmt: skip
        self.processes = {}
        self.web_start()
        self.nginx_start()

    def manage(self, *args, capture=False):
        run = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                             text=True)  # fmt: skip
        if run.returncode:
            raise SystemExit(f"manage.py {' '.join(args)}: {run.stderr.strip()[-2000:]}")
        return run.stdout.strip() if capture else None

    def spawn(self, name, command):
        log = open(self.scratch / f"{name}.log", "w")
        self.processes[name] = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def web_start(self):
        gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or "gunicorn"
        self.spawn("web", [gunicorn, "-c", "docker/gunicorn.conf.py", "genapi.wsgi:application"])
        _wait(lambda: self.status("GET", "/api/ready", direct=True)[0] == 200, 300, "gunicorn ready")

    def nginx_start(self):
        """docker/nginx/genapi.conf as compose mounts it, pointed at this run's ports and files."""
        tls = self.scratch / "tls"
        subprocess.run(["sh", ROOT / "docker" / "tls-selfsigned.sh", tls], check=True, capture_output=True)
        site = (ROOT / "docker" / "nginx" / "genapi.conf").read_text()
        for old, new in [
            ("server web:8000;", f"server 127.0.0.1:{self.web_port};"),
            ("listen 80;", f"listen 127.0.0.1:{self.http_port};"),
            ("listen 443 ssl;", f"listen 127.0.0.1:{self.https_port} ssl;"),
            ("/etc/nginx/genapi-proxy.conf", str(ROOT / "docker" / "nginx" / "genapi-proxy.conf")),
            ("/etc/genapi/tls/", f"{tls}/"),
        ]:
            assert old in site, old
            site = site.replace(old, new)
        (self.scratch / "genapi.conf").write_text(site)
        # What the nginx image's own nginx.conf gives around conf.d/*.conf.
        (self.scratch / "nginx.conf").write_text(
            f"daemon off; worker_processes 1; pid {self.scratch}/nginx.pid; error_log {self.scratch}/nginx-error.log;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; client_body_temp_path {self.scratch}/nginx-body; "
            f"proxy_temp_path {self.scratch}/nginx-proxy; include {self.scratch}/genapi.conf; }}\n"
        )
        self.spawn("nginx", ["nginx", "-c", str(self.scratch / "nginx.conf"), "-p", str(self.scratch)])
        _wait(lambda: _answers(self.https_port), 10, "nginx start")

    def connection(self, *, direct=False, timeout=30):
        if direct:
            return http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=timeout)
        return http.client.HTTPSConnection("127.0.0.1", self.https_port, timeout=timeout, context=_TLS)

    def status(self, method, path, body=None, *, direct=False, key=True, timeout=30):
        """(status, Retry-After, parsed body or text) of one request on a new connection."""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {self.key}"
        if direct:
            headers["X-Forwarded-Proto"] = "https"  # as nginx says it; else the production settings redirect
        connection = self.connection(direct=direct, timeout=timeout)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = connection.getresponse()
            data = response.read()
            try:
                data = json.loads(data)
            except ValueError:
                data = data.decode(errors="replace")
            return response.status, response.getheader("Retry-After"), data
        except OSError as exc:
            return None, None, repr(exc)
        finally:
            connection.close()

    def close(self):
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.redis.stop()
        try:
            self.postgres.stop()
        except subprocess.CalledProcessError:
            pass


class Poller(threading.Thread):
    """GET ``path`` every ``interval`` s until stopped: (time, latency or None, status) each."""

    def __init__(self, deployment, path, interval=0.2, **kwargs):
        super().__init__(daemon=True)
        self.deployment, self.path, self.interval, self.kwargs = deployment, path, interval, kwargs
        self.samples = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            started = time.perf_counter()
            status, _, _ = self.deployment.status("GET", self.path, timeout=5, **self.kwargs)
            self.samples.append((time.monotonic(), time.perf_counter() - started if status else None, status))
            self.halt.wait(max(0.0, self.interval - (time.perf_counter() - started)))

    def stop(self):
        self.halt.set()
        self.join()
        latencies = [latency if latency is not None else 5.0 for _, latency, _ in self.samples]
        return {
            "requests": len(self.samples),
            "p50_s": _percentile(latencies, 0.5),
            "p99_s": _percentile(latencies, 0.99),
            "failed": sum(1 for _, _, status in self.samples if status != 200),
        }


# --- Phases ------------------------------------------------------------------------------


def _products(count):
    return [attributes for attributes, _ in examples_load(ADIDAS_CSV, count)]


def phase_load(deployment, seconds, clients=64, impatient=False):
    products = _products(clients)
    statuses, missing_retry_after, lock = {}, 0, threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index):
        nonlocal missing_retry_after
        while time.monotonic() < stop_at:
            body = {"product": products[index % len(products)], "max_new_tokens": 8}
            status, retry_after, _ = deployment.status("POST", "/api/generate", body, timeout=120)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status in (429, 503) and not retry_after:
                    missing_retry_after += 1
            if status in (429, 503):
                # As the official openai client does: wait what Retry-After says (at most 10 s here),
                # or a second without it; an impatient client (--impatient) retries after 0.2 s.
                time.sleep(0.2 if impatient else min(float(retry_after or 1), 10.0))

    health = Poller(deployment, "/api/health", key=False)
    health.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "clients": clients,
        "seconds": seconds,
        "retry": "after 0.2 s" if impatient else "after Retry-After (at most 10 s)",
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "server_errors_other_than_503": sum(v for k, v in statuses.items() if k is None or (k >= 500 and k != 503)),
        "refusals_without_retry_after": missing_retry_after,
        "health": health.stop(),
    }


def _slow_client(deployment, direct, halt):
    """Headers, then one body byte a second, until ``halt``."""
    try:
        sock = socket.create_connection(("127.0.0.1", deployment.web_port if direct else deployment.https_port))
        if not direct:
            sock = _TLS.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"X-Forwarded-Proto: https\r\nContent-Length: 1000\r\n\r\n"
        )
        while not halt.wait(1.0):
            sock.sendall(b" ")
    except OSError:
        pass  # cut off by the server: what nginx does to a client that is too slow


def phase_slow(deployment, clients=60, seconds=25):
    results = {}
    products = _products(4)
    for route in ("nginx", "gunicorn directly"):
        direct = route != "nginx"
        halt = threading.Event()
        slow = [threading.Thread(target=_slow_client, args=(deployment, direct, halt), daemon=True)
                for _ in range(clients)]  # fmt: skip
        for thread in slow:
            thread.start()
        time.sleep(2)  # every slow client connected and holding
        health = Poller(deployment, "/api/health", key=False, direct=direct)
        health.start()
        answered, tried = 0, 0
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            started = time.monotonic()
            status, _, _ = deployment.status(
                "POST", "/api/generate", {"product": products[tried % 4], "max_new_tokens": 8}, direct=direct,
                timeout=10,
            )  # fmt: skip
            tried += 1
            answered += status == 200
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        halt.set()
        results[route] = {"health": health.stop(), "generations_answered": answered, "generations_tried": tried}
        for thread in slow:
            thread.join(5)
        time.sleep(2)  # gunicorn's threads come back before the next route
    return results


def _stream(deployment, body, on_first_chunk=None):
    """Chunk arrival times and the final usage of one SSE stream."""
    connection = deployment.connection(timeout=300)
    connection.request("POST", "/api/generate", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {deployment.key}"})  # fmt: skip
    response = connection.getresponse()
    arrivals, done = [], None
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"event: "):
            name = line[7:].strip().decode()
            data = json.loads(response.readline()[6:])
            response.readline()
            if name == "chunk":
                arrivals.append(time.monotonic())
                if len(arrivals) == 1 and on_first_chunk:
                    on_first_chunk()
            elif name in ("done", "error"):
                done = data
                break
    connection.close()
    return arrivals, done


def _long_prompt(deployment, index, *, tokens):
    """A free prompt of at most ``tokens`` tokens as the server counts them (chat template
    included), opening with its own words so that no prompt reuses another's keys."""
    from django.conf import settings
    from transformers import AutoTokenizer

    from finetuning import prompts, store

    directory = Path(deployment.env["MODEL_STORE"]) / store.base_relpath(settings.BASE_MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    sentence = "This trail running shoe has a grippy rubber outsole, a breathable mesh upper and a cushioned midsole. "
    text = f"Product {index}. Describe it in one line. "
    while len(tokenizer(prompts.free_prompt(text + sentence), add_special_tokens=False)["input_ids"]) <= tokens:
        text += sentence
    return text


def phase_prefill(deployment):
    stream_body = {"prompt": "Write a long, detailed guide to choosing running shoes.", "max_new_tokens": 160,
                   "temperature": 0.8, "seed": 7}  # fmt: skip
    long_prompts = [_long_prompt(deployment, i, tokens=1000) for i in range(3)]
    deployment.status("POST", "/api/generate", {**stream_body, "max_new_tokens": 4})  # warm
    alone, alone_done = _stream(deployment, stream_body)
    long_times = []

    def send_long():
        def one(prompt):
            started = time.monotonic()
            status, _, body = deployment.status("POST", "/api/generate", {"prompt": prompt, "max_new_tokens": 8},
                                                timeout=300)  # fmt: skip
            usage = body.get("usage", {}) if isinstance(body, dict) else {}
            long_times.append((started, time.monotonic(), status, usage.get("prompt_tokens"), body))

        for prompt in long_prompts:
            threading.Thread(target=one, args=(prompt,), daemon=True).start()

    mixed, mixed_done = _stream(deployment, stream_body, on_first_chunk=send_long)
    _wait(lambda: len(long_times) == 3, 300, "the long prompts' answers")

    def gaps(arrivals):
        return [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]

    def rate(arrivals, start=None, end=None):
        inside = [t for t in arrivals if (start is None or t >= start) and (end is None or t <= end)]
        return (len(inside) - 1) / (inside[-1] - inside[0]) if len(inside) > 2 else None

    sent = min(t[0] for t in long_times)
    first_answered = min(t[1] for t in long_times)
    alone_rate = rate(alone)
    during = rate(mixed, sent, first_answered)
    return {
        "same_text": alone_done["choices"] == mixed_done["choices"] if alone_done and mixed_done else False,
        "long_prompt_tokens": [t[3] for t in long_times],
        "long_prompt_statuses": [t[2] for t in long_times],
        "long_prompt_errors": [t[4] for t in long_times if t[2] != 200],
        "alone": {"chunks": len(alone), "longest_gap_s": max(gaps(alone)), "chunks_per_s": alone_rate},
        "with_long_prompts": {
            "chunks": len(mixed),
            "longest_gap_s": max(gaps(mixed)),
            "chunks_per_s_while_prefilling": during,
            "chunks_per_s_whole_run": rate(mixed),
            "long_prompts_answered_after_s": sorted(t[1] - t[0] for t in long_times),
        },
        "ratio_while_prefilling": during / alone_rate if during and alone_rate else None,
        "ratio_whole_run": rate(mixed) / alone_rate if alone_rate else None,
    }


def phase_database(deployment, clients=8, outage=30.0):
    products = _products(clients)
    results, lock = [], threading.Lock()
    halt = threading.Event()

    def generate(index):
        while not halt.is_set():
            status, retry_after, _ = deployment.status(
                "POST", "/api/generate", {"product": products[index], "max_new_tokens": 8}, timeout=60
            )
            with lock:
                results.append((time.monotonic(), "generate", status, retry_after))

    def models():
        while not halt.is_set():
            status, retry_after, _ = deployment.status("GET", "/api/models", timeout=10)
            with lock:
                results.append((time.monotonic(), "models", status, retry_after))
            time.sleep(0.25)

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(clients)] + [threading.Thread(target=models)]
    ready = Poller(deployment, "/api/ready", interval=0.25, key=False)
    for thread in [*threads, ready]:
        thread.start()
    time.sleep(5)
    stopped = time.monotonic()
    deployment.postgres.stop()
    time.sleep(outage)
    deployment.postgres.start()
    started = time.monotonic()
    time.sleep(15)
    halt.set()
    for thread in threads:
        thread.join()
    ready.stop()

    def summary(kind, start, end):
        rows = [r for r in results if r[1] == kind and start <= r[0] < end]
        statuses = {}
        for _, _, status, _ in rows:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        return {"statuses": statuses, "503_without_retry_after": sum(1 for r in rows if r[2] == 503 and not r[3])}

    def back(kind_rows):
        after = [t for t, status in kind_rows if t >= started and status == 200]
        return after[0] - started if after else None

    return {
        "outage_s": outage,
        "generate_during_outage": summary("generate", stopped, started),
        "models_during_outage": summary("models", stopped, started),
        "after": {kind: summary(kind, started, float("inf")) for kind in ("generate", "models")},
        "server_errors_other_than_503": sum(1 for r in results if r[2] is None or (r[2] >= 500 and r[2] != 503)),
        "models_back_after_s": back([(r[0], r[2]) for r in results if r[1] == "models"]),
        "ready_back_after_s": back([(t, status) for t, _, status in ready.samples]),
    }


def phase_redis(deployment):
    status, _, job = deployment.status(
        "POST", "/api/jobs", {"dataset": "seed", "hyperparameters": {"max_steps": 2, "batch_size": 2,
                                                                     "max_seq_length": 160}},
    )  # fmt: skip
    if status != 202:
        return {"error": f"POST /api/jobs answered {status}: {job}"}
    deployment.redis.stop()
    deployment.redis.start()  # empty: the job's task is gone
    lost = deployment.status("GET", f"/api/jobs/{job['id']}")[2]["status"]
    started = time.monotonic()
    celery = [sys.executable, "-m", "celery", "-A", "genapi", "worker", "-l", "info", "-c", "1"]
    deployment.spawn("worker", [*celery, "-Q", "training", "--max-tasks-per-child", "1", "-n", "training@%h"])
    deployment.spawn("scheduler", [*celery, "-Q", "celery", "-B", "-n", "scheduler@%h",
                                   "-s", str(deployment.scratch / "beat-schedule")])  # fmt: skip
    final, history = None, []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        body = deployment.status("GET", f"/api/jobs/{job['id']}")[2]
        if not history or history[-1][1] != body["status"]:
            history.append((round(time.monotonic() - started, 1), body["status"]))
        if body["status"] in ("succeeded", "failed", "cancelled"):
            final = body
            break
        time.sleep(1)
    return {
        "status_after_redis_restart": lost,
        "history_s": history,
        "final_status": final["status"] if final else "still " + history[-1][1],
        "error": final.get("error") if final else None,
        "seconds_to_end": history[-1][0] if final else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--load-seconds", type=float, default=60)
    parser.add_argument("--impatient", action="store_true", help="load: clients retry after 0.2 s, not Retry-After")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"--phases: unknown {sorted(unknown)}; choose from {', '.join(PHASES)}")
    for tool in ("nginx", "redis-server", "openssl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt install nginx-light redis-server openssl)")
    django_setup()
    scratch = Path(tempfile.mkdtemp(prefix="genapi-fault-"))
    os.chmod(scratch, 0o755)
    report = {}
    deployment = Deployment(scratch)
    try:
        runners = {
            "load": lambda: phase_load(deployment, args.load_seconds, impatient=args.impatient),
            "slow": lambda: phase_slow(deployment),
            "prefill": lambda: phase_prefill(deployment),
            "database": lambda: phase_database(deployment),
            "redis": lambda: phase_redis(deployment),
        }
        for name in phases:
            started = time.monotonic()
            report[name] = runners[name]()
            report[name]["phase_seconds"] = round(time.monotonic() - started, 1)
            print(f"== {name}\n{json.dumps(report[name], indent=2, default=str)}", flush=True)
    finally:
        deployment.close()
    print(f"logs: {scratch}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
