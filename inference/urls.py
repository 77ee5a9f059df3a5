from django.urls import path

from inference import api

urlpatterns = [
    path("generate", api.GenerateView.as_view(), name="generate"),
    path("models", api.ModelListView.as_view(), name="models"),
    path("usage", api.UsageView.as_view(), name="usage"),
    path("health", api.HealthView.as_view(), name="health"),
    path("ready", api.ReadyView.as_view(), name="ready"),
]
