"""The OpenAPI schema tells the truth: it validates, its examples fit it, and a
bounded schemathesis run (every check, with an API key and without) finds no response
outside it and no request the server judges differently from it."""

import json
import os
import subprocess
import sys

import pytest
from django.core.management import call_command
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from inference import loader
from tests.conftest import REPO

# Generated requests per operation and phase: enough to find a schema that lies, in about a minute.
SCHEMATHESIS_EXAMPLES = 20


@pytest.fixture
def spec(client, db):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return json.loads(response.content)


@pytest.mark.django_db
def test_openapi_schema_builds_without_warnings(tmp_path):
    out = tmp_path / "schema.yaml"
    # --fail-on-warn turns every drf-spectacular warning into a failure.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for path in ("/api/generate", "/api/models", "/api/usage", "/api/jobs", "/v1/chat/completions", "/v1/models"):
        assert f"{path}:" in text
    assert "From product attributes" in text  # request examples are documented


def test_the_schema_passes_openapi_spec_validator(spec):
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def _examples(spec):
    """(where, example value, schema) of every example in the schema."""
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            bodies = [("request", operation.get("requestBody", {}))]
            bodies += [(f"response {code}", response) for code, response in operation["responses"].items()]
            for role, body in bodies:
                for media_type, content in body.get("content", {}).items():
                    for name, example in content.get("examples", {}).items():
                        yield (
                            f"{method.upper()} {path} {role} {media_type} {name!r}",
                            example["value"],
                            content["schema"],
                        )


def test_every_example_fits_its_schema(spec):
    examples = list(_examples(spec))
    assert len(examples) >= 10
    for where, value, schema in examples:
        # The components ride along, so that "#/components/..." references resolve.
        validator = OAS31Validator({**schema, "components": spec["components"]})
        errors = [error.message for error in validator.iter_errors(value)]
        assert not errors, f"{where}: {errors}"


def test_every_error_status_has_a_json_body(spec):
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")):
                    assert "application/json" in response.get("content", {}), f"{method} {path} {code}"


@pytest.mark.django_db
def test_schema_and_docs_are_served(client):
    assert client.get("/api/schema/").status_code == 200
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and b"swagger-ui" in docs.content
    assert client.get("/api/redoc/").status_code == 200


@pytest.mark.parametrize("path", ["/api/jobs/-391", "/api/nothing", "/v1/nothing", "/api/generate/", "/v1/models/"])
def test_404s_under_the_apis_are_json(client, db, path, settings):
    settings.DEBUG = True  # where Django would answer its HTML debug page
    response = client.get(path)
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    body = response.json()
    assert ("error" in body) if path.startswith("/v1/") else ("detail" in body)


# --- schemathesis ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the server's threads must see the key
@pytest.mark.parametrize("caller", ["with a key", "anonymous"])
def test_a_bounded_schemathesis_run_finds_no_failure(
    base_version, key_factory, live_server, tmp_path, django_user_model, caller
):
    """Every check, every phase, with a key that may do everything (its owner may run jobs),
    and without credentials (every answer then a documented 401, never a 5xx); the generate
    routes run the tiny model. A failure prints schemathesis' report, with the request to
    replay it."""
    loader.model_get(base_version)  # loaded, as a web process warms it at start: /api/ready is 200
    if caller == "anonymous":
        # Valid data is refused without a key, by design: that check is for the keyed run.
        credentials = ["--exclude-checks", "positive_data_acceptance,positive_data_acceptance_within_the_context"]
    else:
        owner = django_user_model.objects.create_superuser("schemathesis", password="unused-password")
        _, header = key_factory(owner=owner, requests_per_minute=100_000, tokens_per_minute=10_000_000)
        # positive_data_acceptance through tests/schemathesis_hooks.py, which allows the one 400
        # no schema can foresee: a prompt longer than the model's context in tokens.
        credentials = [
            "--exclude-checks", "positive_data_acceptance", "--header", f"Authorization: {header['HTTP_AUTHORIZATION']}"
        ]  # fmt: skip
    command = [
        sys.executable, "-m", "schemathesis.cli", "--no-color", "run", f"{live_server.url}/api/schema/",
        "--checks", "all", *credentials,
        "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--workers", "1", "--request-timeout", "60",
        "--generation-deterministic", "--suppress-health-check", "all",
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
