"""The serving image's URLs (genapi/settings/serving.py): generation, the OpenAI-compatible routes,
the schema and its pages, probes and metrics. No admin and no fine-tuning API: there is no
database server, broker or worker behind it."""

from django.urls import include, path, re_path

from genapi.urls import docs_urlpatterns, operations_urlpatterns
from inference.errors import not_found

urlpatterns = [
    path("api/", include("inference.urls")),
    path("v1/", include("inference.openai_compat.urls")),
    *docs_urlpatterns,
    *operations_urlpatterns,
    re_path(r"^(?:api|v1)/", not_found),
]
handler400 = "inference.errors.bad_request"
handler404 = "inference.errors.not_found"
handler500 = "inference.errors.server_error"
