import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command


@pytest.mark.django_db
def test_ensure_admin_generates_a_password_once(capsys, monkeypatch):
    monkeypatch.delenv("GENAPI_ADMIN_PASSWORD", raising=False)
    call_command("ensure_admin")
    out = capsys.readouterr().out
    password = out.split("password: ")[1].split()[0]
    user = get_user_model().objects.get(username="admin")
    assert user.is_superuser and user.check_password(password)
    call_command("ensure_admin")
    assert "already exists" in capsys.readouterr().out


@pytest.mark.django_db
def test_ensure_admin_takes_the_password_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("GENAPI_ADMIN_PASSWORD", "from-the-env-123")
    call_command("ensure_admin", "--username", "curator")
    assert "from-the-env-123" not in capsys.readouterr().out
    assert get_user_model().objects.get(username="curator").check_password("from-the-env-123")
