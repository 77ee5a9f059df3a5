"""The deployment files: Kubernetes manifests (docker/kubernetes), the Cloud Run service
(docker/cloudrun), compose (docker/compose.yml) and the cost table (docs/costs.py).

No cluster, kustomize binary or internet is needed: a small loader renders the kustomizations
(resources, components, strategic-merge patches, images, labels, namespace: the features they use,
and it refuses any other) and every Kubernetes object is checked against the API's published schema
(kubernetes-validate, strict: an unknown field is an error). Where `kubectl` is installed, the
loader's rendering must equal `kubectl kustomize`'s."""

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "docker" / "kubernetes"
CLOUD_RUN = ROOT / "docker" / "cloudrun" / "service.yaml"
# GKE's regular channel as of writing; the schemas ship with kubernetes-validate.
KUBERNETES_VERSION = "1.31.0"
KUSTOMIZATIONS = ["base", "migrate", "overlays/gke", "overlays/gke/migrate"]
APP_OF = {"migrate": "base", "overlays/gke/migrate": "overlays/gke"}
PROJECT_IMAGES = {"genapi", "genapi-gpu", "genapi-serving"}
# Custom resources have no schema in kubernetes-validate: checked for their essentials only.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("networking.gke.io/v1", "ManagedCertificate"),
    ("networking.gke.io/v1beta1", "FrontendConfig"),
    ("cloud.google.com/v1", "BackendConfig"),
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# --- The loader --------------------------------------------------------------------------------


def render(directory, components=()):
    """The objects `kubectl kustomize directory` prints (with extra components added)."""
    return _build(Path(directory), [], extra_components=components)


def _build(directory, objects, extra_components=()):
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "components", "patches", "images", "labels", "namespace"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: the test's loader does not handle {sorted(unknown)}")
    objects = list(objects)
    for entry in spec.get("resources", []):
        path = directory / entry
        objects += _build(path, []) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in [*spec.get("components", []), *extra_components]:
        objects = _build((directory / entry).resolve(), objects)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{directory}: only strategic-merge patches by path are handled, not {patch}")
        change = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [
            o for o in objects if (o["kind"], o["metadata"]["name"]) == (change["kind"], change["metadata"]["name"])
        ]
        if len(targets) != 1:
            raise ValueError(f"{patch['path']}: matches {len(targets)} objects, not one")
        _merge(targets[0], change)
    for obj in objects:
        for image in spec.get("images", []):
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
        for label in spec.get("labels", []):
            if label.get("includeSelectors") or label.get("includeTemplates"):
                raise ValueError(f"{directory}: labels with includeSelectors/includeTemplates are not handled")
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
        if "namespace" in spec and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def _merge(target, patch):
    """Strategic merge as kustomize does it for these patches: maps merge, lists of named items
    (containers, env, volumes) merge by name, other lists are replaced."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise ValueError(f"patch directive {key} is not handled")
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif (
            isinstance(value, list)
            and isinstance(current, list)
            and all(isinstance(v, dict) and "name" in v for v in value)
        ):
            for item in value:
                same = [c for c in current if c.get("name") == item["name"]]
                _merge(same[0], item) if same else current.append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def _pod_spec(obj):
    return obj["spec"]["template"]["spec"] if obj["kind"] in POD_OWNERS else None


def _containers(obj):
    pod = _pod_spec(obj)
    return [] if pod is None else [*pod.get("initContainers", []), *pod["containers"]]


def _one(objects, kind, name):
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _key(obj):
    return (obj["kind"], obj["metadata"]["name"])


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request):
    return request.param, render(KUBE / request.param)


@pytest.fixture(scope="module")
def gke():
    return render(KUBE / "overlays" / "gke") + render(KUBE / "overlays" / "gke" / "migrate")


def _selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


# --- Schemas and rendering ----------------------------------------------------------------------


def test_every_object_is_valid_for_the_kubernetes_api(rendered):
    name, objects = rendered
    assert objects, f"{name} renders nothing"
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            assert obj["metadata"]["name"] and isinstance(obj.get("spec"), dict), f"{name}: {_key(obj)}"
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {path}: {exc.message}")


def test_optional_servicemonitor_component_renders_and_selects_the_web_service():
    objects = render(KUBE / "base", components=["../components/servicemonitor"])
    monitor = _one(objects, "ServiceMonitor", "genapi-web")
    service = _one(objects, "Service", "genapi-web")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_loader_renders_what_kubectl_kustomize_does(name):
    out = subprocess.run(["kubectl", "kustomize", str(KUBE / name)], capture_output=True, text=True, check=True)
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=_key)
    assert sorted(render(KUBE / name), key=_key) == theirs


def test_secret_example_is_not_applied_and_holds_no_secret():
    objects = [o for name in KUSTOMIZATIONS for o in render(KUBE / name)]
    assert not [o for o in objects if o["kind"] == "Secret"], "kubectl apply -k would overwrite the real Secret"
    example = yaml.safe_load((KUBE / "base" / "secret.example.yaml").read_text())
    # Placeholders only: a password to change or a host under example.internal.
    assert all("change-me" in v or ".example.internal" in v for v in example["stringData"].values())


# --- What an operator would notice ----------------------------------------------------------------


def test_every_container_runs_a_project_image(rendered):
    name, objects = rendered
    for obj in objects:
        for container in _containers(obj):
            repository = container["image"].rsplit(":", 1)[0] if "@" not in container["image"] else container["image"]
            assert repository.rsplit("/", 1)[-1].split("@")[0] in PROJECT_IMAGES, f"{name}: {container['image']}"


def test_overlay_images_come_from_the_registry_with_a_tag(gke):
    for obj in gke:
        for container in _containers(obj):
            assert re.fullmatch(r"[\w.-]+-docker\.pkg\.dev/[\w-]+/genapi/genapi(-gpu)?:[\w.-]+", container["image"]), (
                container["image"]
            )


def test_web_probes_use_ready_and_health_on_the_container_port(rendered):
    name, objects = rendered
    if name.endswith("migrate"):
        return
    web = _one(objects, "Deployment", "genapi-web")
    (container,) = _pod_spec(web)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/api/ready"
    assert probes["livenessProbe"]["path"] == "/api/health"
    for kind, probe in probes.items():
        port = ports.get(probe["port"], probe["port"])
        assert port in ports.values(), f"{kind} probes port {probe['port']}, the container exposes {ports}"
    # gunicorn's default bind (docker/gunicorn.conf.py) and the image's EXPOSE.
    assert list(ports.values()) == [8000]
    # Model load: the startup probe must allow minutes before liveness may restart the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


def test_probes_host_header_is_an_allowed_host():
    """kubelet and the load balancer send the pod's IP as Host; Django answers 400 to a Host not
    in ALLOWED_HOSTS, which would fail every probe."""
    objects = render(KUBE / "base")
    config = _one(objects, "ConfigMap", "genapi-config")["data"]
    (container,) = _pod_spec(_one(objects, "Deployment", "genapi-web"))["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    hosts = env["ALLOWED_HOSTS"]["value"].split(",")
    assert "$(POD_IP)" in hosts and "$(ALLOWED_HOSTS)" in hosts and config["ALLOWED_HOSTS"]
    # $(ALLOWED_HOSTS) expands to the ConfigMap's value only because envFrom precedes env.
    assert any(ref.get("configMapRef", {}).get("name") == "genapi-config" for ref in container["envFrom"])


def test_hpa_pdb_and_service_address_the_web_pods_only(rendered):
    name, objects = rendered
    if name.endswith("migrate"):
        return
    web = _one(objects, "Deployment", "genapi-web")
    hpa = _one(objects, "HorizontalPodAutoscaler", "genapi-web")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "genapi-web"}
    assert hpa["spec"]["minReplicas"] >= 2, "one web pod: every rollout or node drain is an outage"
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert _selects(web["spec"]["selector"]["matchLabels"], labels)
    others = [o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] in POD_OWNERS and o is not web]
    assert others, "the workers' pods are missing"
    service = _one(objects, "Service", "genapi-web")
    pdb = _one(objects, "PodDisruptionBudget", "genapi-web")
    for what, selector in (("Service", service["spec"]["selector"]), ("PDB", pdb["spec"]["selector"]["matchLabels"])):
        assert _selects(selector, labels), f"the {what} does not select the web pods"
        assert not any(_selects(selector, other) for other in others), f"the {what} also selects worker pods"
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {p["name"] for p in _pod_spec(web)["containers"][0]["ports"]}


def test_training_worker_gets_a_gpu_and_tolerates_gpu_nodes(rendered):
    name, objects = rendered
    if name.endswith("migrate"):
        return
    worker = _one(objects, "Deployment", "genapi-training-worker")
    pod = _pod_spec(worker)
    (container,) = pod["containers"]
    assert container["image"].split(":")[0].endswith("genapi-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert ["-Q", "training"] == container["command"][4:6] and "--max-tasks-per-child" in container["command"]
    # Celery waits for the running job on SIGTERM; much less than this kills most jobs.
    assert pod["terminationGracePeriodSeconds"] >= 1800
    if name == "overlays/gke":
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_scheduler_runs_exactly_once(rendered):
    name, objects = rendered
    if name.endswith("migrate"):
        return
    scheduler = _one(objects, "Deployment", "genapi-scheduler")
    assert scheduler["spec"]["replicas"] == 1 and scheduler["spec"]["strategy"] == {"type": "Recreate"}
    beats = [
        c for o in objects for c in _containers(o) if "-B" in c.get("command", []) or "beat" in c.get("command", [])
    ]
    assert len(beats) == 1, "only the scheduler may run Celery beat"


def test_every_celery_queue_has_a_worker():
    objects = render(KUBE / "base")
    queues = {
        c["command"][c["command"].index("-Q") + 1]
        for o in objects
        for c in _containers(o)
        if "-Q" in c.get("command", [])
    }
    assert queues == {"training", "evaluation", "celery"}  # genapi/settings/base.py CELERY_TASK_ROUTES, default queue


def test_migrate_job_migrates_then_prepares_the_base_model():
    job = _one(render(KUBE / "overlays" / "gke" / "migrate"), "Job", "genapi-migrate")
    (container,) = _pod_spec(job)["containers"]
    script = container["command"][-1]
    assert script.index("migrate --noinput") < script.index("prepare_base_model") < script.index("ensure_admin")
    app = {c["image"] for o in render(KUBE / "overlays" / "gke") for c in _containers(o) if "gpu" not in c["image"]}
    assert app == {container["image"]}, "the migrate Job and the app must run the same build"


def test_pods_run_as_non_root_with_a_read_only_root(rendered):
    name, objects = rendered
    for obj in objects:
        pod = _pod_spec(obj)
        if pod is None:
            continue
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
        mounts_needed = {"/var/lib/genapi", "/tmp"}  # GENAPI_VAR_DIR (beat schedule, model cache), tempfiles
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts_needed <= set(mounts), f"{name}: {obj['metadata']['name']} cannot write {mounts_needed}"
            assert all("emptyDir" in volumes[v] for v in mounts.values())
            multiproc = {e["name"]: e.get("value") for e in container.get("env", [])}.get("PROMETHEUS_MULTIPROC_DIR")
            if multiproc:
                assert multiproc in mounts, "PROMETHEUS_MULTIPROC_DIR must be a writable volume"


# --- Environment variables ----------------------------------------------------------------------

# Read by a library rather than by the project's code; each must appear in that package's source.
LIBRARY_ENV = {
    "DJANGO_SETTINGS_MODULE": "django",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus_client",
    "AWS_ACCESS_KEY_ID": "botocore",
    "AWS_SECRET_ACCESS_KEY": "botocore",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "botocore",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "botocore",
}
_READ = re.compile(
    r"""(?:\benv(?:\.\w+)?\(\s*|os\.environ\.get\(\s*|os\.getenv\(\s*|os\.environ\[\s*|os\.environ\.setdefault\(\s*)["']([A-Z][A-Z0-9_]+)["']"""
)


def names_the_code_reads():
    sources = [*ROOT.glob("genapi/**/*.py"), *ROOT.glob("finetuning/**/*.py"), *ROOT.glob("inference/**/*.py")]
    sources += [*ROOT.glob("docker/*.py"), ROOT / "manage.py"]
    return {name for path in sources for name in _READ.findall(path.read_text())}


def _library_reads(package, name):
    spec = importlib.util.find_spec(package)
    root = Path(spec.origin).parent
    return any(name in path.read_text(errors="ignore") for path in root.rglob("*.py"))


def _env_names(objects):
    """(container, name, value) of every variable a container gets, envFrom's ConfigMap keys included."""
    configs = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    for obj in objects:
        for container in _containers(obj):
            where = f"{obj['metadata']['name']}/{container['name']}"
            for ref in container.get("envFrom", []):
                for name, value in configs.get(ref.get("configMapRef", {}).get("name"), {}).items():
                    yield where, name, value
            for entry in container.get("env", []):
                yield where, entry["name"], entry.get("value")


def test_settings_scan_finds_what_settings_read():
    """The scan below is only as good as its pattern: it must see these."""
    assert {
        "SECRET_KEY",
        "DATABASE_URL",
        "MODEL_STORE_URL",
        "WEB_CONCURRENCY",
        "GENAPI_ADMIN_PASSWORD",
    } <= names_the_code_reads()


def test_every_variable_set_is_one_the_code_reads():
    read = names_the_code_reads()
    objects = [o for name in KUSTOMIZATIONS for o in render(KUBE / name)]
    cloud_run = yaml.safe_load(CLOUD_RUN.read_text())
    entries = list(_env_names(objects))
    entries += [
        ("cloud run", e["name"], e.get("value")) for e in cloud_run["spec"]["template"]["spec"]["containers"][0]["env"]
    ]
    expanded = {ref for _, _, value in entries for ref in re.findall(r"\$\((\w+)\)", value or "")}
    for where, name, _ in entries:
        if name in read:
            continue
        if name in LIBRARY_ENV:
            assert _library_reads(LIBRARY_ENV[name], name), f"{name} is not read by {LIBRARY_ENV[name]}"
            continue
        # A helper only there to be expanded into another variable (POD_IP into ALLOWED_HOSTS).
        assert name in expanded, f"{where} sets {name}, which neither genapi nor a library it uses reads"


def test_every_reference_resolves():
    secret = yaml.safe_load((KUBE / "base" / "secret.example.yaml").read_text())
    for name in KUSTOMIZATIONS:
        objects = render(KUBE / name)
        # The migrate Job reads the ConfigMap of the app it migrates for (applied before it).
        app = render(KUBE / APP_OF.get(name, name))
        configs = {o["metadata"]["name"]: o["data"] for o in app if o["kind"] == "ConfigMap"}
        for obj in objects:
            for container in _containers(obj):
                defined = set()
                for ref in container.get("envFrom", []):
                    assert ref["configMapRef"]["name"] in configs
                    defined |= set(configs[ref["configMapRef"]["name"]])
                for entry in container.get("env", []):
                    source = entry.get("valueFrom", {})
                    if "secretKeyRef" in source:
                        ref = source["secretKeyRef"]
                        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], ref
                    if "configMapKeyRef" in source:
                        ref = source["configMapKeyRef"]
                        assert ref["key"] in configs[ref["name"]], ref
                    for used in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
                        assert used in defined, (
                            f"{obj['metadata']['name']}: $({used}) is not defined before {entry['name']}"
                        )
                    defined.add(entry["name"])


def test_workers_and_web_share_the_model_store_through_the_bucket(gke):
    config = _one(gke, "ConfigMap", "genapi-config")["data"]
    assert (
        config["MODEL_STORE_URL"].startswith("s3://")
        and config["MODEL_STORE_ENDPOINT_URL"] == "https://storage.googleapis.com"
    )
    assert config["MODEL_STORE"].startswith(config["GENAPI_VAR_DIR"])


# --- Cloud Run ----------------------------------------------------------------------------------


def test_cloud_run_service_has_what_cloud_run_requires():
    service = yaml.safe_load(CLOUD_RUN.read_text())
    assert service["apiVersion"] == "serving.knative.dev/v1" and service["kind"] == "Service"
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,47}[a-z0-9])?", service["metadata"]["name"])
    template = service["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]  # one container serves (sidecars would need a named ingress)
    assert container["image"].rsplit(":", 1)[0].endswith("/genapi-serving")
    (port,) = container["ports"]
    assert port["containerPort"] == 8000 and port.get("name", "http1") in {"http1", "h2c"}
    assert 1 <= spec["containerConcurrency"] <= 1000 and 1 <= spec["timeoutSeconds"] <= 3600
    limits = container["resources"]["limits"]
    assert limits["cpu"] in {"1", "2", "4", "6", "8"} and re.fullmatch(r"\d+(Mi|Gi)", limits["memory"])
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/api/ready" and startup["httpGet"]["port"] == port["containerPort"]
    assert startup["periodSeconds"] * startup["failureThreshold"] <= 240  # Cloud Run's most
    hosts = next(e["value"] for e in container["env"] if e["name"] == "ALLOWED_HOSTS").split(",")
    assert {
        h["value"] for p in ("startupProbe", "livenessProbe") for h in container[p]["httpGet"]["httpHeaders"]
    } <= set(hosts)
    annotations = template["metadata"]["annotations"]
    assert int(annotations["autoscaling.knative.dev/minScale"]) <= int(annotations["autoscaling.knative.dev/maxScale"])
    for entry in container["env"]:
        if "valueFrom" in entry:
            assert set(entry["valueFrom"]["secretKeyRef"]) == {"name", "key"}  # Secret Manager: name + version


# --- compose ------------------------------------------------------------------------------------

COMPOSE_SCHEMAS = [Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")]


def test_compose_file_follows_the_compose_specification():
    schema_path = next((p for p in COMPOSE_SCHEMAS if p.is_file()), None)
    if schema_path is None:
        pytest.skip("no copy of the compose-spec JSON schema on this machine")
    import jsonschema

    schema = json.loads(schema_path.read_text())
    compose = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


# --- Costs --------------------------------------------------------------------------------------


def _costs():
    spec = importlib.util.spec_from_file_location("costs", ROOT / "docs" / "costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_table_follows_from_the_prices_and_measurements():
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "costs.py")], capture_output=True, text=True, check=True)
    prices = json.loads((ROOT / "docs" / "prices.json").read_text())
    measured = json.loads((ROOT / "docs" / "measured_serving.json").read_text())
    # Recompute one row by hand: an e2-standard-2 VM, the default engine, 8 streams at once, busy all hour.
    vm = next(o for o in prices["options"] if o["id"] == "gce-e2-standard-2")
    default = measured["rows"]["none"]
    rate = default["aggregate_8_clients_tokens_per_second"]
    tokens = prices["assumptions"]["tokens_per_description"]
    per_1000 = 1000 * tokens / rate / 3600 * vm["usd_per_hour"]
    setting = default["label"].removeprefix("engine, ")
    row = next(line for line in out.stdout.splitlines() if line.startswith("| GCE e2-standard-2") and setting in line)
    assert f"${per_1000:.3f}" in row, row
    latency = tokens / default["one_stream_tokens_per_second"]
    assert f"{latency:.1f} s" in row
    assert "not measured" in out.stdout and "check" in out.stdout.lower()


def test_cost_table_write_replaces_only_the_marked_block(tmp_path):
    costs = _costs()
    report = tmp_path / "REPORT.md"
    report.write_text("# Report\n\nbefore\n\n<!-- costs:begin -->\nstale table\n<!-- costs:end -->\n\nafter\n")
    subprocess.run([sys.executable, str(ROOT / "docs" / "costs.py"), "--write", "--report", str(report)], check=True)
    once = report.read_text()
    assert once.startswith("# Report\n\nbefore\n\n<!-- costs:begin -->\n") and once.endswith(
        "<!-- costs:end -->\n\nafter\n"
    )
    assert "stale table" not in once and "| GCE e2-standard-2" in once
    assert costs.with_table(once, costs.table()) == once  # a second run changes nothing
    for name in ("REPORT.md", "REPORT.template.md"):
        text = (ROOT / "docs" / name).read_text()
        assert text.count(costs.BEGIN) == 1 and text.count(costs.END) == 1, name


def test_cost_inputs_missing_a_field_are_refused_by_name(tmp_path):
    costs = _costs()
    prices = json.loads((ROOT / "docs" / "prices.json").read_text())
    del prices["options"][0]["source"]
    with pytest.raises(costs.InputError, match=r"options\[0\]\.source"):
        costs.check_prices(prices)
