import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_openapi_schema_builds_and_validates_without_warnings(tmp_path):
    out = tmp_path / "schema.yaml"
    # --fail-on-warn turns every drf-spectacular warning into a failure.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for path in ("/api/generate", "/api/models", "/api/health", "/api/ready"):
        assert f"{path}:" in text
    assert "From product attributes" in text  # request examples are documented


@pytest.mark.django_db
def test_schema_and_docs_are_served(client):
    assert client.get("/api/schema/").status_code == 200
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and b"swagger-ui" in docs.content
    assert client.get("/api/redoc/").status_code == 200
