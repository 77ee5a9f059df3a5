from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from inference.auth import ThrottledAdminLoginForm
from inference.errors import not_found

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("inference.urls")),
    path("api/", include("finetuning.urls")),
    path("v1/", include("inference.openai_compat.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
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
