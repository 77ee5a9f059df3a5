"""API keys as a client meets them: who gets in, with which scopes, and what the database keeps."""

import datetime
import hashlib
import json

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from finetuning.services.versions import version_approve, version_register
from inference.models import ApiKey
from inference.services.keys import ApiKeyError, key_create, key_revoke, key_update

PRODUCT = {"name": "Trail Running Shoe", "color": "Grey"}


def _generate(client, header=None, **body):
    return client.post(
        "/api/generate",
        data=json.dumps({"product": PRODUCT, "max_new_tokens": 2, **body}),
        content_type="application/json",
        **(header or {}),
    )


def test_the_database_never_holds_the_key(key_factory, django_user_model):
    owner = django_user_model.objects.create_user("shop")
    key, raw = key_create(name="cms", owner=owner)
    assert raw.startswith(key.prefix + "_") and len(raw) > 50
    row = ApiKey.objects.filter(pk=key.pk).values().get()
    assert all(raw not in str(value) for value in row.values())
    assert row["key_hash"] == hashlib.sha256(raw.encode()).hexdigest()
    assert key.scopes == ["generate", "models:read"]  # the default: generate and list, nothing more


def test_a_key_lets_its_client_generate_and_stamps_its_last_use(client, base_version, key_factory):
    key, header = key_factory(scopes="generate")
    assert key.last_used_at is None
    response = _generate(client, header)
    assert response.status_code == 200, response.content
    key.refresh_from_db()
    assert key.last_used_at is not None and timezone.now() - key.last_used_at < datetime.timedelta(seconds=10)


def test_without_a_key_generation_is_refused_outside_development(client, base_version, settings):
    settings.GENERATE_ALLOW_ANONYMOUS = False
    response = _generate(client)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="genapi"'
    assert "Authorization: Bearer" in response.json()["detail"]
    settings.GENERATE_ALLOW_ANONYMOUS = True  # development
    assert _generate(client).status_code == 200
    assert client.get("/api/models").status_code == 200
    assert client.get("/api/usage").status_code == 401  # a key's own usage needs the key
    assert client.get("/api/jobs").status_code == 401  # never anonymous


def test_a_revoked_key_gets_a_401_saying_so(client, base_version, key_factory):
    key, header = key_factory()
    assert _generate(client, header).status_code == 200
    key_revoke(key=key)
    response = _generate(client, header)
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_an_expired_key_gets_a_401_saying_so(client, base_version, key_factory):
    key, header = key_factory(expires_at=timezone.now() + datetime.timedelta(days=1))
    assert _generate(client, header).status_code == 200
    key_update(key=key, name=key.name, scopes=key.scopes, expires_at=timezone.now() - datetime.timedelta(seconds=1))
    response = _generate(client, header)
    assert response.status_code == 401 and "expired" in response.json()["detail"]


@pytest.mark.parametrize("header", ["Bearer gk_00000000_nope", "Bearer nonsense", "Bearer", "Bearer a b"])
def test_an_unknown_or_malformed_key_gets_a_401(client, base_version, key_factory, header):
    key_factory()
    response = _generate(client, {"HTTP_AUTHORIZATION": header})
    assert response.status_code == 401 and response.json()["detail"]


def test_a_right_prefix_with_a_wrong_secret_is_refused(client, base_version, key_factory):
    key, header = key_factory()
    forged = header["HTTP_AUTHORIZATION"][:-4] + "AAAA"
    assert _generate(client, {"HTTP_AUTHORIZATION": forged}).status_code == 401


def test_a_deactivated_owner_disables_the_key(client, base_version, key_factory):
    key, header = key_factory()
    assert _generate(client, header).status_code == 200  # the key is in the cache now
    key.owner.is_active = False
    key.owner.save()
    response = _generate(client, header)
    assert response.status_code == 401 and "deactivated" in response.json()["detail"]


def test_the_wrong_scope_is_a_403_naming_it(client, base_version, key_factory):
    _, reader = key_factory(scopes="models:read")
    response = _generate(client, reader)
    assert response.status_code == 403 and "'generate' scope" in response.json()["detail"]
    assert client.get("/api/models", **reader).status_code == 200
    _, writer = key_factory(scopes="generate")
    assert client.get("/api/models", **writer).status_code == 403


@pytest.fixture
def unreleased(base_version, model_store):
    """A version that is neither active nor approved (the base's files under another name)."""
    return version_register(
        name="shop-job5",
        kind="base",
        base_model=base_version.base_model,
        relpath=base_version.artifact_path,
        sha256=base_version.sha256,
        hyperparameters={},
        metrics={},
    )


def test_an_unreleased_version_by_name_needs_the_unreleased_scope(client, unreleased, key_factory, settings):
    _, plain = key_factory(scopes="generate,models:read")
    refused = _generate(client, plain, model_version="shop-job5")
    assert refused.status_code == 403
    assert "not released" in refused.json()["detail"] and "models:unreleased" in refused.json()["detail"]
    assert [v["name"] for v in client.get("/api/models", **plain).json()["versions"]] == ["base-tiny-llama"]
    settings.GENERATE_ALLOW_ANONYMOUS = True
    assert _generate(client, model_version="shop-job5").status_code == 403  # nor anonymously in development

    _, insider = key_factory(scopes="generate,models:read,models:unreleased")
    allowed = _generate(client, insider, model_version="shop-job5")
    assert allowed.status_code == 200 and allowed.json()["model_version"]["name"] == "shop-job5"
    assert {v["name"] for v in client.get("/api/models", **insider).json()["versions"]} == {
        "base-tiny-llama",
        "shop-job5",
    }

    version_approve(version=unreleased)  # approved for clients: every key may name it
    assert _generate(client, plain, model_version="shop-job5").status_code == 200


def test_job_scopes_act_within_the_owners_permissions(client, base_version, key_factory, django_user_model):
    owner = django_user_model.objects.create_user("ci-bot")
    _, header = key_factory(owner=owner, scopes="jobs:read,jobs:write")
    assert client.get("/api/jobs", **header).status_code == 403  # the owner may not view jobs
    owner.user_permissions.add(*Permission.objects.filter(codename="view_finetuningjob"))
    assert client.get("/api/jobs", **header).status_code == 200
    refused = client.post("/api/jobs", {"dataset": "x"}, content_type="application/json", **header)
    assert refused.status_code == 403 and "add_finetuningjob" in refused.json()["detail"]
    _, reader = key_factory(owner=owner, scopes="jobs:read", name="reader")
    refused = client.post("/api/jobs", {"dataset": "x"}, content_type="application/json", **reader)
    assert refused.status_code == 403 and "'jobs:write' scope" in refused.json()["detail"]


def test_a_key_starts_and_cancels_a_job(client, base_version, key_factory, django_user_model, dataset_factory):
    dataset_factory()
    owner = django_user_model.objects.create_user("ci-bot")
    owner.user_permissions.add(
        *Permission.objects.filter(codename__in=["add_finetuningjob", "view_finetuningjob", "change_finetuningjob"])
    )
    _, header = key_factory(owner=owner, scopes="jobs:read,jobs:write")
    started = client.post("/api/jobs", {"dataset": "shop"}, content_type="application/json", **header)
    assert started.status_code == 202 and started.json()["requested_by"] == "ci-bot"
    job = started.json()["id"]
    assert client.get(f"/api/jobs/{job}", **header).json()["status"] == "queued"
    assert client.post(f"/api/jobs/{job}/cancel", **header).json()["status"] == "cancelled"


def test_bad_key_input_names_the_field(django_user_model):
    owner = django_user_model.objects.create_user("shop")
    cases = [
        ({"name": " "}, "name"),
        ({"scopes": "generate,admin"}, "scopes"),
        ({"scopes": ""}, "scopes"),
        ({"expires_at": timezone.now() - datetime.timedelta(days=1)}, "expires_at"),
        ({"requests_per_minute": 0}, "requests_per_minute"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ApiKeyError) as caught:
            key_create(**{"name": "cms", "owner": owner, **kwargs})
        assert caught.value.field == field
    assert not ApiKey.objects.exists()


def test_the_command_prints_the_key_once_lists_and_revokes(client, base_version, django_user_model, capsys):
    django_user_model.objects.create_user("shop")
    call_command("apikey", "create", "--name", "cms", "--owner", "shop", "--scopes", "generate", "--expires", "30d")
    raw = capsys.readouterr().out.strip()
    assert raw.startswith("gk_")
    assert _generate(client, {"HTTP_AUTHORIZATION": f"Bearer {raw}"}).status_code == 200

    call_command("apikey", "list")
    listing = capsys.readouterr().out
    assert raw[:11] in listing and raw not in listing and "cms" in listing and "generate" in listing

    call_command("apikey", "create", "--name", "cms", "--owner", "shop", "--if-missing")
    assert "exists" in capsys.readouterr().out and ApiKey.objects.count() == 1

    call_command("apikey", "revoke", raw[:11])
    assert "is now revoked" in capsys.readouterr().out
    assert _generate(client, {"HTTP_AUTHORIZATION": f"Bearer {raw}"}).status_code == 401
    call_command("apikey", "list")
    assert raw[:11] not in capsys.readouterr().out  # revoked keys only with --all


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--name", "x", "--owner", "nobody"], "--owner: no user named 'nobody'"),
        (["create", "--name", "x", "--owner", "shop", "--scopes", "root"], "--scopes: unknown scope 'root'"),
        (["create", "--name", "x", "--owner", "shop", "--expires", "soon"], "--expires"),
        (["create", "--name", " ", "--owner", "shop"], "--name: a key needs a name"),
        (["revoke", "gk_00000000"], "no API key"),
    ],
)
def test_the_command_refuses_bad_input_in_one_line(django_user_model, args, message):
    django_user_model.objects.create_user("shop")
    with pytest.raises(CommandError) as caught:
        call_command("apikey", *args)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not ApiKey.objects.exists()


def test_the_admin_shows_a_new_key_once(admin_client, base_version, admin_user):
    response = admin_client.post(
        "/admin/inference/apikey/add/",
        {"name": "cms plugin", "owner": admin_user.pk, "scopes": ["generate", "models:read"]},
    )
    assert response.status_code == 200, response.content
    key = ApiKey.objects.get()
    page = response.content.decode()
    raw = page.split('id="api-key" type="text" readonly value="')[1].split('"')[0]
    assert raw.startswith(key.prefix) and "no-store" in response["Cache-Control"]
    assert key.key_hash == hashlib.sha256(raw.encode()).hexdigest() and key.created_by == admin_user
    change = admin_client.get(f"/admin/inference/apikey/{key.pk}/change/").content.decode()
    listing = admin_client.get("/admin/inference/apikey/").content.decode()
    assert key.prefix in change and raw not in change and raw not in listing

    revoked = admin_client.post(f"/admin/inference/apikey/{key.pk}/revoke/", follow=True)
    assert "is revoked" in revoked.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_the_admin_refuses_a_key_without_scopes_or_with_a_past_expiry(admin_client, admin_user):
    response = admin_client.post(
        "/admin/inference/apikey/add/",
        {"name": "cms", "owner": admin_user.pk, "expires_at_0": "2001-01-01", "expires_at_1": "00:00"},
    )
    page = response.content.decode()
    assert response.status_code == 200 and "This field is required" in page and "must be in the future" in page
    assert not ApiKey.objects.exists()
