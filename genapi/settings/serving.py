"""The serving image (docker/Dockerfile, target ``serving``): one version baked in, registered in a
SQLite registry inside the image, served without PostgreSQL, Redis or Celery. Production otherwise:
HTTPS ends at the platform's front end (Cloud Run, App Runner, a load balancer), which says so in
X-Forwarded-Proto; on a plain VM without one, set SECURE_SSL_REDIRECT=false."""

import os

# Nothing here sends tasks; the setting only has to name a transport that needs no server.
os.environ.setdefault("CELERY_BROKER_URL", "memory://")
# No curator reads a generation log here: nothing is recorded.
os.environ.setdefault("GENERATION_LOG_RETENTION_DAYS", "0")

from .production import *  # noqa: E402,F403
from .production import env  # noqa: E402

# The generation API, the OpenAI-compatible routes, the schema, probes and metrics: no admin, no
# fine-tuning API (there is nothing to train with).
ROOT_URLCONF = "genapi.serving_urls"
SERVING_ONLY = True
# Full keys (gk_…, made by `manage.py apikey create` on the full service) that may call this
# server, comma-separated; registered at start, and keys no longer listed are revoked. Left empty,
# only GENERATE_ALLOW_ANONYMOUS=true lets anyone in (behind a platform's own sign-in, e.g. Cloud
# Run without --allow-unauthenticated).
SERVING_API_KEYS = env.list("SERVING_API_KEYS", default=[])
