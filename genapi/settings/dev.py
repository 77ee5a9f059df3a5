import os

os.environ.setdefault("DEBUG", "true")
# `make run` answers the README's curl without an API key; nowhere else does.
os.environ.setdefault("GENERATE_ALLOW_ANONYMOUS", "true")

from .base import *  # noqa: E402,F403
