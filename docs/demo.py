"""The live demo: the whole loop a presenter shows, start to end, with the service's own
commands and APIs and nothing staged.

    make demo                      # the real base model; pauses between steps (Enter goes on)
    python docs/demo.py --test     # unattended, the tiny test model, short steps (the tests run it)

1. starts the service (gunicorn, a training worker and an evaluation worker) on a scratch
   database, model store and broker in var/demo/, so that nothing of yours is touched;
2. imports a small file of examples (the seed examples) with `manage.py import_examples`;
3. starts a short fine-tune through `POST /api/jobs` and shows its progress from `GET /api/jobs/ID`;
4. evaluates the new version against the base with `manage.py evaluate`;
5. activates it with `manage.py activate`;
6. calls `POST /api/generate` with curl, then the OpenAI-compatible routes with the official
   `openai` client, plain and streamed;
7. shows where the admin's playground is, and the Prometheus metrics the calls left.

The base model is prepared on first use (about 40 s for SmolLM2); the short fine-tune takes about
three minutes on 2 CPU cores. Exits non-zero, saying at which step, when one fails.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "finetuning" / "seed" / "examples.jsonl"
PRODUCT = {
    "name": "Trail Runner 2",
    "category": "Shoes",
    "color": "Black",
    "features": ["mesh upper", "rubber outsole"],
}


class DemoFailed(RuntimeError):
    pass


def say(text):
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def pause(args):
    if not args.test:
        input("   (Enter for the next step) ")


def manage(env, *arguments, capture=False):
    shown = " ".join(arguments)
    print(f"$ python manage.py {shown}", flush=True)
    result = subprocess.run(
        [sys.executable, "manage.py", *arguments], cwd=ROOT, env=env, text=True, capture_output=capture
    )
    if result.returncode:
        raise DemoFailed(f"manage.py {shown} exited {result.returncode}: {(result.stderr or '')[-800:]}")
    return result.stdout


def request(method, url, key=None, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening (yet)
        return None, str(exc.reason)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def process(command, env, log_path):
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield child
        finally:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def wait_until(check, *, timeout, what, every=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise DemoFailed(f"{what}: not within {timeout:.0f} s")


def scratch_env(args):
    scratch = args.scratch
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "genapi.settings.dev",
        "GENAPI_VAR_DIR": str(scratch),
        "DATABASE_URL": f"sqlite:///{scratch / 'demo.sqlite3'}",
        "MODEL_STORE": str(scratch / "models"),
        "GENAPI_ADMIN_PASSWORD": os.environ.get("GENAPI_ADMIN_PASSWORD", "demo-password"),
        "GENERATE_ALLOW_ANONYMOUS": "false",  # the calls below use the demo's key, as a client's would
        "PYTHONUNBUFFERED": "1",
        # The kernels `make install` built (they are not part of the scratch data).
        "INFERENCE_NATIVE_DIR": os.environ.get("INFERENCE_NATIVE_DIR", str(ROOT / "var" / "native")),
    }
    env.pop("CELERY_BROKER_URL", None)  # the broker in files under var/demo/, as `make run` uses
    env.pop("CACHE_URL", None)
    if args.base_source:
        env["BASE_MODEL_SOURCE"], env["BASE_MODEL_NAME"] = args.base_source, args.base_name
    if args.test:
        env.update({"JOB_PROGRESS_SECONDS": "0.2", "TRAINING_TORCH_THREADS": "1", "INFERENCE_TORCH_THREADS": "1"})
    return env


def demo(args):
    env = scratch_env(args)
    logs = args.scratch / "logs"
    logs.mkdir()
    steps = 2 if args.test else 30
    examples = 3 if args.test else 8

    say("1. The service: set up once, then a web process and two workers")
    manage(env, "migrate", "--noinput", "-v0")
    manage(env, "prepare_base_model")
    manage(env, "ensure_admin")
    key = manage(env, "apikey", "create", "--name", "demo", "--owner", "admin", "--scopes", "all", capture=True)
    key = key.strip().splitlines()[-1]
    print(f"   an API key for this demo: {key[:10]}…")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        gunicorn = [sys.executable, "-m", "gunicorn", "genapi.wsgi:application", "-b", f"127.0.0.1:{port}",
                    "-w", "1", "--threads", "4", "--worker-class", "gthread"]  # fmt: skip
        web = stack.enter_context(process(gunicorn, env, logs / "web.log"))
        celery = [sys.executable, "-m", "celery", "-A", "genapi", "worker", "-c", "1", "-l", "info"]
        stack.enter_context(process([*celery, "-Q", "training", "-n", "training@%h", "--max-tasks-per-child", "1"],
                                    env, logs / "training.log"))  # fmt: skip
        stack.enter_context(process([*celery, "-Q", "evaluation", "-n", "evaluation@%h"], env, logs / "evaluation.log"))
        wait_until(lambda: web.poll() is not None or request("GET", f"{url}/api/health")[0] == 200,
                   timeout=60, what="the web process answering /api/health")  # fmt: skip
        if web.poll() is not None:
            raise DemoFailed(f"the web process stopped: {(logs / 'web.log').read_text()[-800:]}")
        print(f"   the service answers at {url}  (admin: {url}/admin/, user admin; API docs: {url}/api/docs/)")
        pause(args)

        say("2. A curator imports a small file of examples")
        manage(env, "import_examples", str(SEED), "--dataset", "demo")
        pause(args)

        say(f"3. A fine-tune of {steps} steps, started through the API; its progress as the API reports it")
        status, body = request("POST", f"{url}/api/jobs", key, {
            "dataset": "demo", "hyperparameters": {"max_steps": steps, "batch_size": 4, "lora_r": 8, "lora_alpha": 16},
        })  # fmt: skip
        if status != 202:
            raise DemoFailed(f"POST /api/jobs answered {status}: {body}")
        job = json.loads(body)
        print(f"   job {job['id']} {job['status']}")
        shown = None

        def finished():
            nonlocal job, shown
            status, body = request("GET", f"{url}/api/jobs/{job['id']}", key)
            if status != 200:  # e.g. 429 from the key's limits: ask again at the next poll
                print(f"   GET /api/jobs/{job['id']} answered {status}; asking again", flush=True)
                return False
            job = json.loads(body)
            line = f"   {job['status']:9} step {job['step']}/{job['total_steps'] or '?'}"
            if job["loss_history"]:
                line += f"  loss {job['loss_history'][-1][1]:.3f}"
            if job["eta_seconds"] is not None and job["status"] == "running":
                line += f"  about {job['eta_seconds']:.0f} s left"
            if line != shown:
                print(line, flush=True)
                shown = line
            return job["status"] in ("succeeded", "failed", "cancelled")

        # Every 2 s: well inside the key's per-minute request limit.
        wait_until(finished, timeout=1800, what="the fine-tuning job", every=0.5 if args.test else 2.0)
        if job["status"] != "succeeded":
            raise DemoFailed(f"the job {job['status']}: {job['error']}")
        version = job["model_version"]["name"]
        print(f"   new model version: {version}")
        pause(args)

        say("4. Its evaluation beside the base model, on the same held-out examples")
        size = ["--limit", str(examples), *(["--max-new-tokens", "32"] if args.test else [])]
        manage(env, "evaluate", "--version", "base", "--split-of", version, *size)
        manage(env, "evaluate", "--version", version, *size)
        pause(args)

        say("5. The curator activates it")
        manage(env, "activate", version, "--reason", "the demo: the new version's evaluation above")
        status, body = request("GET", f"{url}/api/models", key)
        active = (json.loads(body).get("active") or {}).get("name")
        print(f"   GET /api/models: active {active}")
        if active != version:
            raise DemoFailed(f"GET /api/models shows {active} active, not {version}")
        pause(args)

        say("6. Clients: curl, then the official openai package, plain and streamed")
        payload = json.dumps({"product": PRODUCT, "max_new_tokens": 48})
        curl = ["curl", "-sS", "-X", "POST", f"{url}/api/generate", "-H", f"Authorization: Bearer {key}",
                "-H", "Content-Type: application/json", "-d", payload]  # fmt: skip
        print(f"$ curl -X POST {url}/api/generate -H 'Authorization: Bearer …' -d '{payload}'")
        answer = subprocess.run(curl, capture_output=True, text=True, timeout=120)
        if answer.returncode or '"text"' not in answer.stdout:
            raise DemoFailed(f"curl: {answer.returncode} {answer.stdout[-500:]} {answer.stderr[-300:]}")
        print(f"   {answer.stdout[:600]}")
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key=key)
        chat = client.chat.completions.create(
            model=version, max_tokens=48, messages=[{"role": "user", "content": "Describe a black trail running shoe."}]
        )
        print(f"   openai chat.completions: {chat.choices[0].message.content!r}")
        print("   streamed: ", end="", flush=True)
        pieces = 0
        for chunk in client.chat.completions.create(
            model=version, max_tokens=48, stream=True, messages=[{"role": "user", "content": "A red cotton t-shirt."}]
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        if not pieces:
            raise DemoFailed("the streamed completion sent no text")
        pause(args)

        say("7. The playground and the metrics")
        print(
            f"   playground: {url}/admin/finetuning/modelversion/playground/ (the active version; each version's page has one)"
        )
        status, _ = request("GET", f"{url}/admin/finetuning/modelversion/playground/")
        if status not in (200, 302):  # 302: to the login page
            raise DemoFailed(f"the playground answered {status}")
        status, body = request("GET", f"{url}/metrics")
        lines = [line for line in body.splitlines() if line.startswith("genapi_") and " " in line]
        for line in lines[:8]:
            print(f"   {line}")
        if status != 200 or not lines:
            raise DemoFailed(f"GET /metrics answered {status} with no genapi_ metric")
        if not args.test:
            input("\n   The service is still up for questions: Enter stops it. ")
    say("Done: every step ran")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", action="store_true", help="unattended, short steps (the test suite runs this)")
    parser.add_argument("--scratch", type=Path, default=ROOT / "var" / "demo", help="where its data goes (emptied)")
    parser.add_argument("--base-source", help="BASE_MODEL_SOURCE for the demo (default: the setting's)")
    parser.add_argument("--base-name", help="BASE_MODEL_NAME with --base-source")
    args = parser.parse_args()
    if bool(args.base_source) != bool(args.base_name):
        parser.error("--base-source and --base-name go together")
    try:
        demo(args)
    except (DemoFailed, KeyboardInterrupt) as exc:
        print(f"\ndemo: stopped: {exc or 'interrupted'} (logs in {args.scratch / 'logs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
