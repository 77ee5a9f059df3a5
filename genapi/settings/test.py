import os

os.environ.setdefault("DEBUG", "false")
os.environ.setdefault("SECRET_KEY", "test-only-key")
# Usage rows written as each request ends, so a test reads them at once (the batched writer has
# its own test).
os.environ.setdefault("USAGE_FLUSH_SECONDS", "0")
# Plain greedy text, as transformers' generate() writes it, which the engine's tests compare with:
# the repeated n-gram rule (on by default in service) has tests of its own that turn it on.
os.environ.setdefault("GENERATE_NO_REPEAT_NGRAM_SIZE", "0")

from .base import *  # noqa: E402,F403
from .base import DATABASES, VAR_DIR  # noqa: E402

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:, so that a real worker process sees the test data.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
