"""The playground: generate with a version, the active version and the base side by side.

The version page shows the panel (templates/admin/finetuning/modelversion/playground.html);
its script asks ``playground_generate_view`` once per column, each answer a stream of JSON
lines (inference/services/playground.py says why), so a slow model never holds the others."""

import json

from django.contrib import messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import NoReverseMatch, path, reverse

from finetuning.models import ModelVersion
from finetuning.selectors import active_version_get
from inference.services.playground import (
    PlaygroundInvalid,
    PlaygroundUnavailable,
    decoding_controls,
    playground_begin,
    playground_columns,
    playground_events,
    playground_example_get,
    playground_examples,
    playground_request_parse,
)

ATTRIBUTE_INPUTS = (
    ("name", "name", "input", "Required."),
    ("category", "category", "input", ""),
    ("color", "color", "input", ""),
    ("brand", "brand", "input", ""),
    ("audience", "audience", "input", "Who it is for: Women, Kids, Home cooks, …"),
    ("price", "price", "input", 'A number or a price such as "$1,299.00".'),
    ("currency", "currency", "input", ""),
    ("features", "features", "lines", "One per line."),
    ("keywords", "keywords", "lines", "One per line."),
)

# What each decoding control does, after its bounds (which come from the API's serializer).
DECODING_HELP = {
    "max_new_tokens": "{min} to {max} (GENERATE_MAX_NEW_TOKENS); fewer answer sooner.",
    "min_new_tokens": "{min} to {max}: no end of the text before this many tokens; 0 is no such rule.",
    "temperature": "{min} to {max}; 0 decodes greedily: the same text every time.",
    "top_p": "{min} to {max}: sample only from the likeliest tokens that add up to this share.",
    "repetition_penalty": "{min} to {max}; 1 is none.",
    "no_repeat_ngram_size": "{min} to {max}: no run of this many tokens twice in the text; 0 is no such rule.",
    "seed": "Blank: a random one when sampling, shown with the output.",
    "fact_guard": "No material, technology, sport, fit or certification of the fact vocabulary that the "
    "attributes do not state; the model writes another word instead, so read what it writes.",
}


def _log_url(generation_id):
    """The generation log entry's admin page, to rate it (None while that admin is absent)."""
    if generation_id is None:
        return None
    try:
        return reverse("admin:inference_generation_change", args=[generation_id])
    except NoReverseMatch:
        return None


def _ndjson(events):
    try:
        for event in events:
            if "done" in event:
                event["done"]["log_url"] = _log_url(event["done"]["generation_id"])
            elif "error" in event:
                event["log_url"] = _log_url(event.get("generation_id"))
            yield (json.dumps(event, ensure_ascii=False) + "\n").encode()
    finally:
        events.close()  # the page left: stop the generation and record it now, not at garbage collection


class PlaygroundMixin:
    """The version admin's playground."""

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path(
                "<int:pk>/playground/generate/",
                view(self.playground_generate_view),
                name="finetuning_modelversion_playground_generate",
            ),
            path(
                "playground/example/<int:example_pk>/",
                view(self.playground_example_view),
                name="finetuning_modelversion_playground_example",
            ),
            path(
                "playground/check/", view(self.playground_check_view), name="finetuning_modelversion_playground_check"
            ),
            path("playground/", view(self.playground_active_view), name="finetuning_modelversion_playground"),
            *super().get_urls(),
        ]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        version = self.get_object(request, unquote(object_id))
        extra = {}
        if version is not None and self.has_view_permission(request):
            extra["playground"] = self._playground_context(request, version)
        return super().change_view(request, object_id, form_url, {**extra, **(extra_context or {})})

    def _playground_context(self, request, version):
        can_view_examples = request.user.has_perm("finetuning.view_trainingexample")
        examples, examples_note = playground_examples(version=version)
        preset = None
        if can_view_examples and request.GET.get("example", "").isdigit():
            preset = playground_example_get(pk=int(request.GET["example"]))
        columns = playground_columns(version=version)
        return {
            "attributes": [
                {"name": name, "label": label, "kind": kind, "help": help_text}
                for name, label, kind, help_text in ATTRIBUTE_INPUTS
            ],
            "decoding": [
                {**control, "help": DECODING_HELP[control["name"]].format(**control)} for control in decoding_controls()
            ],
            "columns": columns,
            "examples": examples,
            "examples_note": examples_note,
            "can_view_examples": can_view_examples,
            "preset": preset,
            "script": {
                "columns": [
                    {
                        "id": column.version.pk,
                        "name": column.version.name,
                        "roles": column.roles,
                        "url": reverse("admin:finetuning_modelversion_playground_generate", args=[column.version.pk]),
                    }
                    for column in columns
                ],
                "examples": examples,
                "preset": preset,
                "example_url": reverse("admin:finetuning_modelversion_playground_example", args=[0]),
                "example_page_url": reverse("admin:finetuning_trainingexample_change", args=[0]),
                "check_url": reverse("admin:finetuning_modelversion_playground_check"),
            },
        }

    def _playground_refuse(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied

    @staticmethod
    def _playground_body(request):
        """The request's JSON body; PlaygroundInvalid when it is not JSON."""
        try:
            return json.loads(request.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise PlaygroundInvalid({"request": ["not valid JSON"]}) from exc

    def playground_check_view(self, request):
        """The form checked once before the columns start, so that a mistake is shown once
        and the outputs already on the page stay."""
        if request.method != "POST":
            return JsonResponse({"error": "POST a JSON body"}, status=405)
        self._playground_refuse(request)
        try:
            playground_request_parse(data=self._playground_body(request))
        except PlaygroundInvalid as exc:
            return JsonResponse({"errors": exc.errors}, status=400)
        return JsonResponse({"errors": {}})

    def playground_generate_view(self, request, pk):
        """One column's generation: JSON in (product, decoding), JSON lines out; a 400 naming
        each bad field, a 503 when the model cannot load or the queue is full."""
        if request.method != "POST":
            return JsonResponse({"error": "POST a JSON body"}, status=405)
        self._playground_refuse(request)
        version = get_object_or_404(ModelVersion, pk=pk)
        try:
            parsed = playground_request_parse(data=self._playground_body(request))
            run = playground_begin(version=version, request=parsed, user=request.user)
        except PlaygroundInvalid as exc:
            return JsonResponse({"errors": exc.errors}, status=400)
        except PlaygroundUnavailable as exc:
            response = JsonResponse({"error": str(exc)}, status=503)
            if exc.retry_after is not None:
                response["Retry-After"] = str(exc.retry_after)
            return response
        response = StreamingHttpResponse(
            _ndjson(playground_events(run=run, request=parsed, user=request.user)),
            content_type="application/x-ndjson",
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each line on as it comes
        response["X-Model-Version"] = version.name
        return response

    def playground_example_view(self, request, example_pk):
        """Any training example by id, to fill the playground's form."""
        self._playground_refuse(request)
        if not request.user.has_perm("finetuning.view_trainingexample"):
            raise PermissionDenied
        example = playground_example_get(pk=example_pk)
        if example is None:
            return JsonResponse({"error": f"there is no training example {example_pk}"}, status=404)
        return JsonResponse(example)

    def playground_active_view(self, request):
        """The active version's playground (an example page's "Try in playground")."""
        self._playground_refuse(request)
        active = active_version_get()
        if active is None:
            self.message_user(request, "No version is active, so there is no playground to open.", messages.ERROR)
            return redirect("admin:finetuning_modelversion_changelist")
        url = reverse("admin:finetuning_modelversion_change", args=[active.pk])
        example = request.GET.get("example", "")
        return redirect(f"{url}?example={example}#playground" if example.isdigit() else f"{url}#playground")
