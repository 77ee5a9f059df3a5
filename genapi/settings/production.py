import os

os.environ.setdefault("DEBUG", "false")
# One JSON object a line, for the log collector; LOG_FORMAT=plain for a person at a terminal.
os.environ.setdefault("LOG_FORMAT", "json")

from .base import *  # noqa: E402,F403
from .base import env  # noqa: E402

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
# HTTPS ends at the proxy in front (docker/nginx), which says so in X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
# Probes and Prometheus inside the deployment's network call the web process directly, over HTTP.
SECURE_REDIRECT_EXEMPT = [r"^api/health$", r"^api/ready$", r"^metrics$"]
# Browsers remember to use HTTPS for this long (they ignore it over a certificate they do not trust).
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=86400)
# For the whole domain, and eligible for browsers' preload lists (which need a request at
# hstspreload.org to take effect): set these to false if other hosts under the domain serve HTTP.
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
SESSION_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=True)
