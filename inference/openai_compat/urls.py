from django.urls import path

from inference.openai_compat import api

urlpatterns = [
    path("models", api.ModelListView.as_view(), name="openai-models"),
    path("models/<path:model>", api.ModelDetailView.as_view(), name="openai-model"),
    path("completions", api.CompletionView.as_view(), name="openai-completions"),
    path("chat/completions", api.ChatCompletionView.as_view(), name="openai-chat-completions"),
]
