from functools import wraps

from django.contrib import admin
from django.shortcuts import redirect, render
from django.templatetags.static import static
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerSplitView

from finetuning.selectors import active_version_get
from inference.api import metrics
from inference.auth import ThrottledAdminLoginForm
from inference.errors import not_found


def landing(request):
    """``/``: what genapi is, the version it serves, and the way to the admin, the API docs and the
    probes (where the admin's "View site" leads). Drawn in the admin's look, header included."""
    context = {**admin.site.each_context(request), "title": "genapi", "active_version": active_version_get()}
    return render(request, "landing.html", context)


def favicon(request):
    # Browsers ask for /favicon.ico on any page without an icon link (the JSON API, the schema).
    # The icon itself is a static file: WhiteNoise serves it, in production under a hashed name
    # cached for good, which is why this resolves the name per request instead of at import.
    return redirect(static("favicon.ico"))


# The API docs pages may load only from this server. The sidecar package serves Swagger UI's and
# ReDoc's bundles from here, but ReDoc's bundle also draws a logo from cdn.redoc.ly under its menu
# (no option turns it off): the browser refuses that (the logo hides itself) instead of asking the
# internet, as it would anything else a future bundle or setting adds. Inline scripts and styles
# are ours (settings, styled-components), so they stay allowed.
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:"
)


def served_offline(view):
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        response.headers["Content-Security-Policy"] = DOCS_CONTENT_SECURITY_POLICY
        return response

    return wrapped


# The schema and its pages. The split view serves its start-up script as a file of its own (no
# inline script), and the ReDoc page is drf-spectacular's less its web-font links: with the
# sidecar's bundles (SWAGGER_UI_DIST/REDOC_DIST = "SIDECAR") and the policy above, neither page
# loads anything from the internet.
docs_urlpatterns = [
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", served_offline(SpectacularSwaggerSplitView.as_view(url_name="schema")), name="swagger-ui"),
    path(
        "api/redoc/",
        served_offline(SpectacularRedocView.as_view(url_name="schema", template_name="api_docs/redoc.html")),
        name="redoc",
    ),
]
# Prometheus: at the root, where scrape configs look by default (see inference.api.metrics for who
# may read it).
operations_urlpatterns = [path("metrics", metrics, name="metrics")]

urlpatterns = [
    path("", landing, name="landing"),
    path("favicon.ico", favicon),
    path("admin/", admin.site.urls),
    path("api/", include("inference.urls")),
    path("api/", include("finetuning.urls")),
    path("v1/", include("inference.openai_compat.urls")),
    *docs_urlpatterns,
    *operations_urlpatterns,
    # Last: any other path under /api/ or /v1/ is a JSON 404, with DEBUG on as well (where Django
    # would otherwise answer its HTML debug page).
    re_path(r"^(?:api|v1)/", not_found),
]
# Under /api/ and /v1/, errors no view answered are JSON too (a client never parses an HTML page).
handler400 = "inference.errors.bad_request"
handler404 = "inference.errors.not_found"
handler500 = "inference.errors.server_error"

admin.site.site_header = "genapi"
admin.site.site_title = "genapi admin"
admin.site.index_title = "Training data, fine-tuning and model versions"
admin.site.login_form = ThrottledAdminLoginForm
