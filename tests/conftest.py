"""Fixtures shared by every test: a tiny randomly initialised Llama model in a
model store of its own, and rows built through the services."""

import shutil
import warnings
from pathlib import Path

import pytest

from tests.tiny_model import TINY_NAME, tiny_checkpoint_build

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint directory (safetensors), like any local base model."""
    return tiny_checkpoint_build(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_prepared(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint prepared once by the real prepare step, in a store."""
    from django.test import override_settings

    from finetuning.services.base_model import base_model_prepare

    root = tmp_path_factory.mktemp("prepared-store")
    with override_settings(MODEL_STORE=root, BASE_MODEL_SOURCE=str(tiny_checkpoint), BASE_MODEL_NAME=TINY_NAME):
        relpath, sha, created = base_model_prepare()
    assert created
    return root, relpath, sha


@pytest.fixture
def model_store(settings, tmp_path, tiny_prepared, tiny_checkpoint):
    """A fresh model store per test holding the prepared tiny base model."""
    root, relpath, _ = tiny_prepared
    store_dir = tmp_path / "models"
    shutil.copytree(root / relpath, store_dir / relpath)
    settings.MODEL_STORE = store_dir
    settings.BASE_MODEL_SOURCE = str(tiny_checkpoint)
    settings.BASE_MODEL_NAME = TINY_NAME
    return store_dir


@pytest.fixture
def base_version(db, model_store, tiny_prepared):
    """The tiny base model registered (and active), as prepare_base_model leaves it."""
    from finetuning.services.versions import base_version_register

    _, relpath, sha = tiny_prepared
    version, _ = base_version_register(base_model=TINY_NAME, relpath=relpath, sha256=sha)
    return version


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    from inference.loader import cache_clear

    cache_clear()
    yield
    cache_clear()


@pytest.fixture
def dataset_factory(db):
    from finetuning.models import Dataset
    from finetuning.services.examples import example_create

    def make(name="shop", examples=24, split="unassigned"):
        dataset = Dataset.objects.create(name=name)
        for i in range(examples):
            example_create(
                dataset=dataset,
                attributes={
                    "name": f"Product {i}",
                    "category": ["Shoes", "Kitchen", "Toys"][i % 3],
                    "color": ["Red", "Blue"][i % 2],
                    "price": 10 + i,
                    "features": [f"feature {i}", "easy care"],
                },
                description=f"Product {i} is a {['red', 'blue'][i % 2]} pick that makes every day a little easier.",
                split=split,
            )
        return dataset

    return make


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def key_factory(db, django_user_model):
    """Make API keys through the service: ``make(scopes=..., owner=..., **limits)`` ->
    (key, the Authorization header for the test client)."""
    from inference.services.keys import key_create

    def make(*, scopes="all", owner=None, name="test client", **limits):
        if owner is None:
            owner, _ = django_user_model.objects.get_or_create(username="client-owner")
        key, raw = key_create(name=name, owner=owner, scopes=scopes, **limits)
        return key, {"HTTP_AUTHORIZATION": f"Bearer {raw}"}

    return make


@pytest.fixture
def auth(key_factory):
    """A key with every scope and room for a test's requests: the header for the test client."""
    _, header = key_factory(requests_per_minute=10_000, tokens_per_minute=1_000_000)
    return header


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Limits count in the cache: every test starts with none spent."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_teardown(item):
    """Before a live-server test's database is emptied, let the server write the generation log
    records it owes: it writes them after the client has its answer, and a write racing the
    teardown's TRUNCATE deadlocks in PostgreSQL."""
    if "live_server" in getattr(item, "fixturenames", ()):
        from inference.services.generation_log import generations_settled

        if not generations_settled(timeout=30):  # not an assert here: the teardown must still run
            warnings.warn("the live server did not write the generation log records it owed within 30 s", stacklevel=1)
    yield
