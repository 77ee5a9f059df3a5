"""Memory of the web process serving the base and two LoRA versions, packed against fp32 base weights.

    python bench/memory_bench.py [--new-tokens 16] [--lora-std 0.08] [--keep] [--json PATH]

Issue 19: "a web process serving the base and two LoRA versions <= 1 GB RSS". In a
scratch directory (removed at the end; the developer's database and model store are
only read: the prepared base model is copied from them) this sets up a SQLite
database and a model store holding the prepared SmolLM2 base (``python manage.py
prepare_base_model``, registered as the project's command registers it) and two LoRA
versions made from it: the training loop's own LoRA settings (``lora_config``: r 16,
alpha 32, q/k/v/o/gate/up/down), A as PEFT initialises it and B drawn from
N(0, ``--lora-std``) instead of zeros, with seeds 1 and 2 (at 0.08 the change to a
q_proj weight has about 5% of that weight's spread, and each adapter changes the
greedy text; at 0.05 seed 2's does not); saved as training saves an adapter
(``save_pretrained``, safetensors), with a recipe and manifest, registered through
``version_register`` and released to clients through ``version_approve``.

Then, for INFERENCE_PACK_WEIGHTS true and false, one after the other in this run, a
fresh ``gunicorn -c docker/gunicorn.conf.py`` with one worker process (anonymous
generation on, the base active): once /api/ready answers, ``POST /api/generate``
asks each of the three versions by name (``model_version``) for a greedy text of
``--new-tokens`` tokens about the same product. Checked: every answer is a 200 from
the version asked for; both LoRA texts differ from the base's (the adapters are
applied); each version's text is the same packed and unpacked (the packing is
lossless). Then the worker's VmRSS (resident now) and VmHWM (the peak since it
started: loading the fp32 checkpoint before packing it is the high point) are read
from /proc/<worker>/status. "weights MB" is what the loader logs for the base's
weights in memory; "checkpoint mapped" is the part of the RSS that is pages of the
base's model.safetensors still mapped into the worker (from /proc/<worker>/smaps):
a tensor kept from the loaded transformers model keeps the whole file's mapping alive.
Target: RSS <= 1024 MB with the packed weights.

The native kernels are the developer's build (INFERENCE_NATIVE_DIR) when it matches
kernels.cpp, else a build made for the run in the scratch directory (about 75 s more);
without them the packed setting would quietly run fp32, so the packed server's log is
checked for that fall-back too.

A benchmark, not a test: it exits 0 whatever the numbers, and 1 only when it cannot
set up or a server does not come up. About 1 minute on 2 cores (2 with a kernel build).
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gunicorn_process import gunicorn_start  # noqa: E402
from train_bench import ROOT, base_dir_get, django_setup  # noqa: E402

TARGET_MB = 1024
PRODUCT = {"name": "Ultraboost 22 Running Shoes", "category": "Shoes", "color": "Core Black"}
LORA_SEEDS = {"bench-lora-a": 1, "bench-lora-b": 2}
FALLBACK = "decoding falls back to fp32 weights"
WEIGHTS_LOGGED = re.compile(r"Loaded the weights of (\S+) \((\w+), (\d+) MB\)")


class SetupError(Exception):
    pass


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _manage(env, *args):
    run = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode:
        raise SetupError(f"manage.py {' '.join(args)} failed:\n{run.stdout}{run.stderr}")
    return run.stdout


# --- the scratch registry -----------------------------------------------------


def lora_versions_make(env, base_name, names_seeds, std):
    """In a process of its own (torch and the model it reads go with it), configured by ``env``:
    one random LoRA version per (name, seed), saved and registered as a training job would."""
    os.environ.update(env)
    django_setup()
    import warnings

    import torch
    import transformers
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT on transformers' deprecated names

    from finetuning import store
    from finetuning.hyperparameters import Hyperparameters
    from finetuning.models import ModelVersion
    from finetuning.prompts import PROMPT_FORMAT_VERSION
    from finetuning.recipe import Recipe
    from finetuning.services.versions import version_approve, version_register
    from finetuning.training import lora_config

    base_relpath = store.base_relpath(base_name)
    base_dir = store.local(base_relpath)
    base_sha = store.manifest_read(base_dir)["sha256"]
    for name, seed in names_seeds.items():
        hp = Hyperparameters(seed=seed)  # the default recipe: LoRA r 16, alpha 32, every projection
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, dtype=torch.float32)
        model = get_peft_model(model, lora_config(hp))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:  # PEFT starts B at zero: the adapter would change nothing
                    parameter.normal_(0.0, std)
        relpath = store.version_relpath(name)
        with store.artifact_writer(relpath) as output_dir:
            model.save_pretrained(output_dir, safe_serialization=True)
            store.recipe_write(
                output_dir,
                Recipe(
                    kind="lora",
                    name=name,
                    base_model=base_name,
                    base_artifact=base_relpath,
                    base_sha256=base_sha,
                    prompt_format_version=PROMPT_FORMAT_VERSION,
                    hyperparameters=hp.as_dict(),
                    data={"made_by": f"bench/memory_bench.py: random adapter, B ~ N(0, {std}), seed {seed}"},
                ),
            )
            sha = store.manifest_write(output_dir)
        version = version_register(name=name, kind=ModelVersion.Kind.LORA, base_model=base_name, relpath=relpath,
                                   sha256=sha, hyperparameters=hp.as_dict(), metrics={})  # fmt: skip
        version_approve(version=version)  # released: a client without the models:unreleased scope may ask for it
        del model


def _isolated(function, *args):
    """Run ``function(*args)`` in a fresh process (its traceback, if any, goes to stderr)."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=function, args=args)
    process.start()
    process.join()
    if process.exitcode:
        raise SetupError(f"{function.__name__} failed (exit code {process.exitcode}); its traceback is above")


def registry_make(scratch, base_dir, base_name, native_dir, lora_std):
    """The scratch environment (database, model store, var directory) with the base and two LoRA
    versions registered; returns (env, base version name, LoRA version names)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "genapi.settings.dev",
        "DEBUG": "false",
        "SECRET_KEY": "memory-bench-only",
        "DATABASE_URL": f"sqlite:///{scratch / 'bench.sqlite3'}",
        "GENAPI_VAR_DIR": str(scratch / "var"),
        "MODEL_STORE": str(scratch / "models"),
        "MODEL_STORE_URL": "",  # this machine's scratch store alone, never a shared bucket
        # Nothing shared with the developer's services either: the local-memory cache, the file broker.
        "CACHE_URL": "locmemcache://memory-bench",
        "CELERY_BROKER_URL": "filesystem://",
        "INFERENCE_NATIVE_DIR": str(native_dir),
        "INFERENCE_QUANTIZE": "none",
        "INFERENCE_MAX_LOADED_VERSIONS": "3",
        "GENERATE_ALLOW_ANONYMOUS": "true",
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "INFO",  # the loader's "Loaded the weights of ... MB" line
        "LOG_FORMAT": "plain",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the gunicorn config makes one per server
    # Copied, not linked: nothing the run does can reach the developer's store.
    shutil.copytree(base_dir, scratch / "models" / "base" / base_dir.name)
    _manage(env, "migrate", "--noinput", "-v0")
    output = _manage(env, "prepare_base_model", "--name", base_name)
    match = re.search(r"Registered model version (\S+) \(active\)", output)
    if not match:
        raise SetupError(f"prepare_base_model did not register an active base version:\n{output}")
    _isolated(lora_versions_make, env, base_name, LORA_SEEDS, lora_std)
    return env, match.group(1), list(LORA_SEEDS)


def native_dir_get(scratch):
    """The developer's kernel build when it matches kernels.cpp, else one made for this run."""
    from django.conf import settings

    from inference import native

    problem = native.problem()
    if problem is None:
        return Path(settings.INFERENCE_NATIVE_DIR), "the developer's build"
    print(f"the native kernels are not built for this kernels.cpp ({problem.splitlines()[0]}); "
          "building them in the scratch directory (about 75 s)", flush=True)  # fmt: skip
    directory = scratch / "native"
    _manage({**os.environ, "INFERENCE_NATIVE_DIR": str(directory)}, "build_kernels")
    return directory, "built for this run"


# --- one server ---------------------------------------------------------------


def _memory_mb(pid):
    """VmRSS, VmHWM, RssAnon and RssFile of ``pid`` in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def _mapped_mb(pid, suffix):
    """Resident MB of the mappings of files whose name ends with ``suffix``."""
    total, current = 0, None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            current = head[5] if len(head) > 5 else ""
        elif head and head[0] == "Rss:" and current and current.endswith(suffix):
            total += int(head[1])
    return total / 1024


def _worker_pid(master_pid):
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    if len(children) != 1:
        raise SetupError(f"expected one gunicorn worker process, found {len(children)}: {children}")
    return int(children[0])


def _generate(port, version, new_tokens):
    body = {"product": PRODUCT, "model_version": version, "max_new_tokens": new_tokens, "temperature": 0}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
            return {"status": response.status, "version": answer["model_version"]["name"],
                    "text": answer["choices"][0]["text"], "tokens": answer["usage"]["completion_tokens"]}  # fmt: skip
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "version": None, "text": None, "error": exc.read().decode(errors="replace")[:500]}


def server_measure(env, scratch, pack, versions, new_tokens):
    """Start a server with INFERENCE_PACK_WEIGHTS=``pack``, generate from every version, read the
    worker's memory; the server is stopped whatever happens."""
    port = _free_port()
    setting = "true" if pack else "false"
    log_path = scratch / f"gunicorn-pack-{setting}.log"
    server_env = {**env, "INFERENCE_PACK_WEIGHTS": setting, "GUNICORN_BIND": f"127.0.0.1:{port}"}
    started = time.monotonic()
    process, log = gunicorn_start(server_env, log_path, port, timeout=300)
    try:
        ready_s = time.monotonic() - started
        worker = _worker_pid(process.pid)
        answers = {version: _generate(port, version, new_tokens) for version in versions}
        memory = _memory_mb(worker)
        checkpoint_mb = _mapped_mb(worker, "model.safetensors")
        master = _memory_mb(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    text = log_path.read_text(errors="replace")
    logged = WEIGHTS_LOGGED.findall(text)
    return {
        "pack_weights": pack,
        "ready_s": ready_s,
        "answers": answers,
        "rss_mb": memory["VmRSS"],
        "peak_mb": memory["VmHWM"],
        "anon_mb": memory.get("RssAnon"),
        "file_mb": memory.get("RssFile"),
        "checkpoint_mapped_mb": checkpoint_mb,
        "master_rss_mb": master["VmRSS"],
        "weights_mb": [int(mb) for _, _, mb in logged],
        "weights_loaded": [path for path, _, _ in logged],
        "fp32_fallback": FALLBACK in text,
        "log_tail": text[-3000:],
    }


# --- report -------------------------------------------------------------------


def checks_make(rows, base, loras):
    checks, ok = [], True
    for row in rows:
        setting = f"INFERENCE_PACK_WEIGHTS={'true' if row['pack_weights'] else 'false'}"
        answers = row["answers"]
        statuses = {v: a["status"] for v, a in answers.items()}
        right = all(a["status"] == 200 and a["version"] == v for v, a in answers.items())
        checks.append(f"{setting}: all three versions answered 200 by name: {'yes' if right else f'NO {statuses}'}")
        ok &= right
        if right:
            differ = [answers[lora]["text"] != answers[base]["text"] for lora in loras]
            checks.append(f"{setting}: both LoRA texts differ from the base's: {'yes' if all(differ) else 'NO'}")
            ok &= all(differ)
        if len(row["weights_loaded"]) != 1:
            checks.append(f"{setting}: base weights loaded {len(row['weights_loaded'])} times (expected once, "
                          f"shared): {row['weights_loaded']}")  # fmt: skip
            ok = False
        if row["pack_weights"] and row["fp32_fallback"]:
            checks.append(f"{setting}: NOT PACKED: the server fell back to fp32 weights (see its log)")
            ok = False
    if all(a["status"] == 200 for row in rows for a in row["answers"].values()) and len(rows) == 2:
        same = [rows[0]["answers"][v]["text"] == rows[1]["answers"][v]["text"] for v in rows[0]["answers"]]
        checks.append(f"each version's text the same packed and unpacked: {sum(same)}/{len(same)}")
        ok &= all(same)
    return checks, ok


def report(rows, checks, new_tokens):
    by_pack = {row["pack_weights"]: row for row in rows}
    unpacked = by_pack.get(False)
    head = (f"{'INFERENCE_PACK_WEIGHTS':24} {'weights MB':>10} {'RSS MB':>8} {'peak MB':>8} {'RSS ratio':>9} "
            f"{'peak ratio':>10}  {'<= 1024 MB':>10}")  # fmt: skip
    print(f"\nOne gunicorn worker serving the base and two LoRA versions ({new_tokens} greedy tokens each):\n")
    print(head)
    print("-" * len(head))
    for row in rows:
        rss_ratio = f"{row['rss_mb'] / unpacked['rss_mb']:.2f}" if unpacked else "-"
        peak_ratio = f"{row['peak_mb'] / unpacked['peak_mb']:.2f}" if unpacked else "-"
        weights = "/".join(str(mb) for mb in row["weights_mb"]) or "?"
        target = "yes" if row["rss_mb"] <= TARGET_MB else "no"
        print(f"{'true' if row['pack_weights'] else 'false':24} {weights:>10} {row['rss_mb']:8.0f} "
              f"{row['peak_mb']:8.0f} {rss_ratio:>9} {peak_ratio:>10}  {target:>10}")  # fmt: skip
    print()
    print("RSS: the worker's VmRSS after the three answers; peak: its VmHWM; ratio: over the unpacked row;")
    print("weights MB: the base's weights as the loader logs them. Resident memory in detail:")
    for row in rows:
        print(f"  pack {'true ' if row['pack_weights'] else 'false'}: anonymous {row['anon_mb']:.0f} MB, "
              f"file-backed {row['file_mb']:.0f} MB (checkpoint file mapped: {row['checkpoint_mapped_mb']:.0f} MB); "
              f"gunicorn master {row['master_rss_mb']:.0f} MB; ready after {row['ready_s']:.1f} s")  # fmt: skip
    print()
    for row in rows:
        for version, answer in row["answers"].items():
            shown = answer["text"] if answer["status"] == 200 else f"HTTP {answer['status']}: {answer.get('error')}"
            print(f"  pack {'true ' if row['pack_weights'] else 'false'} {version:32} {shown!r}")
    print()
    for line in checks:
        print(line)
    packed = by_pack.get(True)
    if packed:
        verdict = "PASS" if packed["rss_mb"] <= TARGET_MB else "FAIL"
        print(f"issue 19 target, packed: RSS {packed['rss_mb']:.0f} MB <= {TARGET_MB} MB: {verdict}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lora-std", type=float, default=0.08, help="standard deviation of the LoRA B matrices")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (its path is printed)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.new_tokens < 1:
        parser.error("--new-tokens: must be at least 1")
    if args.lora_std <= 0:
        parser.error("--lora-std: must be above 0 (B = 0 would leave the base's text unchanged)")

    django_setup()
    from django.conf import settings

    base_dir = base_dir_get()
    if base_dir is None:
        print("the base model is not prepared: run `python manage.py prepare_base_model`", file=sys.stderr)
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    rows = []
    try:
        native_dir, native_source = native_dir_get(scratch)
        print(f"scratch: {scratch}; native kernels: {native_source} ({native_dir})", flush=True)
        env, base, loras = registry_make(scratch, base_dir, settings.BASE_MODEL_NAME, native_dir, args.lora_std)
        versions = [base, *loras]
        for pack in (True, False):
            print(f"INFERENCE_PACK_WEIGHTS={'true' if pack else 'false'}: starting a server...", flush=True)
            rows.append(server_measure(env, scratch, pack, versions, args.new_tokens))
    except (SetupError, subprocess.CalledProcessError) as exc:
        print(f"memory_bench: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # gunicorn_start: the server did not come up; show why
        logs = sorted(scratch.glob("gunicorn-*.log"), key=lambda p: p.stat().st_mtime)
        if logs:
            print(
                f"--- the end of {logs[-1].name} ---\n{logs[-1].read_text(errors='replace')[-6000:]}", file=sys.stderr
            )
        print(f"memory_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    checks, ok = checks_make(rows, base, loras)
    report(rows, checks, args.new_tokens)
    if not ok:
        for row in rows:
            print(f"\n--- the end of the pack={row['pack_weights']} server's log ---\n{row['log_tail']}")
    if args.json:
        kept = [{k: v for k, v in row.items() if k != "log_tail"} for row in rows]
        numbers = {"rows": kept, "checks": checks, "target_mb": TARGET_MB, "new_tokens": args.new_tokens,
                   "lora_std": args.lora_std}  # fmt: skip
        args.json.write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
