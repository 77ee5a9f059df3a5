"""The model store shared through an S3-compatible bucket: moto's S3 server, started here on
a free port, stands in for MinIO or S3, and each "machine" is a MODEL_STORE cache of its own."""

import json
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command

from finetuning import objectstore, store
from finetuning.prompts import PROMPT_FORMAT_VERSION, product_prompt
from finetuning.recipe import Recipe
from finetuning.services import jobs
from finetuning.services.jobs import JobError, job_execute, job_start
from finetuning.services.versions import VersionError, version_activate
from inference import loader
from inference.engine.params import GenerationParams
from inference.generation import generate
from tests.tiny_model import TINY_NAME

FAST = {"max_steps": 2, "batch_size": 4, "max_seq_length": 128}
BASE = f"base/{TINY_NAME}"
RECIPE = Recipe(kind="full", name="round-trip", prompt_format_version=PROMPT_FORMAT_VERSION)
PROMPT = product_prompt({"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"})


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, settings, monkeypatch, tmp_path, model_store):
    """A fresh bucket behind MODEL_STORE_URL; ``model_store`` (holding the prepared base) is
    the first machine's cache. Returns (boto3 client, bucket name, key prefix)."""
    import boto3

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    name = f"models-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    settings.MODEL_STORE_URL = f"s3://{name}/genapi"
    settings.MODEL_STORE_ENDPOINT_URL = s3_endpoint
    return client, name, "genapi/"


def _keys(bucket, under=""):
    client, name, prefix = bucket
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix + under)
    return sorted(item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", []))


def _machine(settings, tmp_path, name):
    """Switch to another machine: an empty cache, and no model in memory."""
    settings.MODEL_STORE = tmp_path / name
    loader.cache_clear()
    return settings.MODEL_STORE


def _write_version(relpath="versions/round-trip"):
    with store.artifact_writer(relpath) as directory:
        (directory / "weights.safetensors").write_bytes(b"weights " * 1000)
        (directory / "tokenizer").mkdir()
        (directory / "tokenizer" / "vocab.json").write_text('{"a": 1}')
        store.recipe_write(directory, RECIPE)
        sha = store.manifest_write(directory)
    return relpath, sha


def _answer(version):
    [completion] = generate(loader.model_get(version), PROMPT, GenerationParams(max_new_tokens=16)).completions
    return completion.text


def test_a_version_saved_on_one_machine_is_fetched_whole_and_verified_on_another(bucket, settings, tmp_path):
    relpath, sha = _write_version()
    assert _keys(bucket, relpath) == [
        f"{relpath}/genapi.json",
        f"{relpath}/manifest.json",
        f"{relpath}/tokenizer/vocab.json",
        f"{relpath}/weights.safetensors",
    ]
    other = _machine(settings, tmp_path, "other")
    assert store.exists(relpath) and not (other / relpath).exists()
    directory = store.local(relpath)
    assert directory == other / relpath
    assert store.manifest_verify(directory) == sha
    assert (directory / "tokenizer" / "vocab.json").read_text() == '{"a": 1}'
    assert store.recipe_read(directory) == RECIPE
    assert not [p for p in (other / "versions").iterdir() if p.name.startswith(".")]


def test_the_manifest_is_uploaded_last_and_a_broken_upload_leaves_nothing(bucket, settings, monkeypatch):
    uploaded = []
    real = objectstore.Bucket.upload

    def recording(self, path, name):
        uploaded.append(name)
        real(self, path, name)

    monkeypatch.setattr(objectstore.Bucket, "upload", recording)
    relpath, _ = _write_version("versions/ordered")
    assert uploaded[-1] == f"{relpath}/manifest.json" and len(uploaded) == 4

    def failing(self, path, name):
        if name.endswith("vocab.json"):
            raise objectstore.ObjectStoreError(f"the object store could not write {name}")
        real(self, path, name)

    monkeypatch.setattr(objectstore.Bucket, "upload", failing)
    with pytest.raises(store.ArtifactError, match="could not write versions/broken/tokenizer/vocab.json"):
        _write_version("versions/broken")
    assert _keys(bucket, "versions/broken") == []
    assert not store.exists("versions/broken")
    assert not (settings.MODEL_STORE / "versions" / "broken").exists()


def test_a_corrupt_object_is_refused_and_leaves_no_cache_entry(bucket, settings, tmp_path, base_version, model_store):
    client, name, prefix = bucket
    call_command("store_push", BASE)
    client.put_object(Bucket=name, Key=f"{prefix}{BASE}/model.safetensors", Body=b"not the weights")
    fresh = _machine(settings, tmp_path, "fresh")
    with pytest.raises(loader.ModelUnavailable) as info:
        loader.model_get(base_version)
    message = str(info.value)
    assert f"{BASE}/model.safetensors" in message and "sha256" in message
    assert str(tmp_path) not in message and name not in message  # no server paths, no bucket
    assert not (fresh / "base").exists() or not any((fresh / "base").iterdir())
    # Activation checks the same way, before anything is served.
    with pytest.raises(VersionError, match="does not match its sha256"):
        version_activate(version=base_version)

    weights = (model_store / BASE / "model.safetensors").read_bytes()
    client.put_object(Bucket=name, Key=f"{prefix}{BASE}/model.safetensors", Body=weights)
    client.delete_object(Bucket=name, Key=f"{prefix}{BASE}/tokenizer.json")
    with pytest.raises(store.ArtifactError, match=f"{BASE}/tokenizer.json is missing from the object store"):
        store.local(BASE)
    assert not any((fresh / "base").iterdir())


def test_an_artifact_without_its_manifest_object_does_not_exist(
    bucket, settings, tmp_path, base_version, dataset_factory
):
    client, name, prefix = bucket
    call_command("store_push", BASE)
    client.delete_object(Bucket=name, Key=f"{prefix}{BASE}/manifest.json")
    assert _keys(bucket, BASE)  # its files are there, but no manifest says they are whole
    web = _machine(settings, tmp_path, "web")
    assert not store.exists(BASE)
    assert not (store.local(BASE) / "manifest.json").exists()
    with pytest.raises(JobError, match="not prepared"):
        job_start(dataset=dataset_factory(), hyperparameters=FAST)
    assert not (web / "base").exists()


def test_a_job_queued_on_one_machine_trained_on_another_is_served_by_a_third(
    bucket, settings, tmp_path, base_version, dataset_factory
):
    call_command("store_push", BASE)
    web = _machine(settings, tmp_path, "web")
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    assert not (web / "base").exists()  # the bucket says the base is prepared: no weights downloaded to queue
    assert _keys(bucket, job.snapshot.path) == [job.snapshot.path]

    worker = _machine(settings, tmp_path, "worker")
    version = job_execute(job_id=job.pk)
    job.refresh_from_db()
    assert version is not None, job.error
    assert (worker / job.snapshot.path).is_file() and (worker / BASE / "manifest.json").is_file()
    assert f"{version.artifact_path}/adapter_model.safetensors" in _keys(bucket, version.artifact_path)
    trained_here = _answer(version)

    serving = _machine(settings, tmp_path, "serving")
    version_activate(version=version)
    assert _answer(version) == trained_here
    assert store.manifest_verify(serving / version.artifact_path) == version.sha256
    assert loader.loaded_weights_paths() == [BASE]


def test_a_version_that_cannot_be_registered_is_removed_from_the_bucket_too(
    bucket, settings, base_version, dataset_factory, monkeypatch
):
    call_command("store_push", BASE)

    def refuse(**kwargs):
        raise JobError("the registry refused it")

    monkeypatch.setattr(jobs, "version_register", refuse)
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)
    assert job_execute(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == "failed" and "refused" in job.error
    assert _keys(bucket, "versions/") == []
    assert not (settings.MODEL_STORE / "versions").exists() or not any((settings.MODEL_STORE / "versions").iterdir())


def test_push_migrates_a_filesystem_store_and_pull_warms_a_new_machine(
    bucket, settings, tmp_path, base_version, dataset_factory, capsys
):
    settings.MODEL_STORE_URL = ""
    job = job_start(dataset=dataset_factory(), hyperparameters=FAST)  # written before the bucket existed
    version = job_execute(job_id=job.pk)
    client, name, prefix = bucket
    settings.MODEL_STORE_URL = f"s3://{name}/genapi"

    call_command("store_push", "--all")
    out = capsys.readouterr().out
    assert "Pushed 3 of 3 artifacts." in out
    assert f"{version.artifact_path}/manifest.json" in _keys(bucket, version.artifact_path)
    call_command("store_push", version.artifact_path + "/")
    assert "already in the object store" in capsys.readouterr().out

    fresh = _machine(settings, tmp_path, "fresh")
    call_command("store_pull", "--all")
    assert "Pulled 3 artifacts." in capsys.readouterr().out
    assert store.manifest_verify(fresh / version.artifact_path) == version.sha256
    assert store.file_sha256(fresh / job.snapshot.path) == job.snapshot.sha256
    assert (fresh / BASE / "model.safetensors").is_file()


def test_push_and_pull_refuse_bad_input_with_one_line(bucket, settings, base_version):
    for args, reason in [
        ((), "or --all"),
        (("--all", BASE), "not both"),
        (("../etc/passwd",), "is not an artifact: expected base/<name>"),
        (("versions/nowhere",), "versions/nowhere is not in the local model store"),
    ]:
        with pytest.raises(CommandError) as info:
            call_command("store_push", *args)
        assert reason in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CommandError, match="versions/nowhere is in neither the object store nor"):
        call_command("store_pull", "versions/nowhere")

    # Another artifact under a name the bucket has already is refused, not overwritten.
    call_command("store_push", BASE)
    manifest = settings.MODEL_STORE / BASE / "manifest.json"
    (settings.MODEL_STORE / BASE / "genapi.json").write_text('{"kind": "base", "name": "changed"}')
    store.manifest_write(settings.MODEL_STORE / BASE)
    with pytest.raises(CommandError, match=f"{BASE} in the object store is a different artifact"):
        call_command("store_push", BASE)
    assert json.loads(manifest.read_text())["sha256"] != base_version.sha256

    settings.MODEL_STORE_URL = ""
    with pytest.raises(CommandError, match="MODEL_STORE_URL is not set"):
        call_command("store_push", "--all")


def test_preparing_the_base_shares_a_local_copy_and_finds_one_another_machine_shared(bucket, settings, tmp_path):
    from finetuning.services.base_model import base_model_prepare

    sha = store.manifest_verify(settings.MODEL_STORE / BASE)
    assert base_model_prepare() == (BASE, sha, False)  # prepared before the bucket: uploaded now
    assert f"{BASE}/manifest.json" in _keys(bucket, BASE)
    other = _machine(settings, tmp_path, "other")
    assert base_model_prepare() == (BASE, sha, False)
    assert not (other / "base").exists()  # nothing converted, nothing downloaded


def test_a_bad_store_url_names_the_setting(bucket, settings):
    settings.MODEL_STORE_URL = "minio.internal/models"
    with pytest.raises(ImproperlyConfigured, match="MODEL_STORE_URL must look like s3://bucket"):
        store.exists("versions/elsewhere")


def test_without_a_store_url_nothing_reaches_a_bucket(model_store, monkeypatch, settings):
    assert settings.MODEL_STORE_URL == ""
    monkeypatch.setattr(objectstore, "Bucket", None)  # any use would fail
    relpath, sha = _write_version("versions/local-only")
    assert store.local(relpath) == model_store / relpath and store.manifest_verify(model_store / relpath) == sha
    assert not store.exists("versions/elsewhere")


def test_readiness_reports_whether_the_bucket_answers(bucket, settings, client):
    checks = client.get("/api/ready").json()["checks"]
    assert checks["model_store"] == "ok"
    settings.MODEL_STORE_URL = "s3://no-such-bucket-here/genapi"
    answer = client.get("/api/ready").json()
    assert answer["checks"]["model_store"] == "the model store's bucket does not answer (the log says why)"
    # Serving goes on without the bucket: reported, not failed on.
    assert "model_store: the model store's bucket does not answer (the log says why)" in answer["warnings"]
