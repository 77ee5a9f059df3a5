"""Evaluations: a version scored beside the active version and the base model; sizing
a queued one, and cancelling."""

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.urls import path
from django.utils.html import format_html

from finetuning.admin.display import ProgressMixin, next_or
from finetuning.comparison import comparison_build
from finetuning.forms import json_pretty
from finetuning.metrics import METRICS, metric_format
from finetuning.models import Evaluation
from finetuning.services.evaluations import (
    EvaluationError,
    EvaluationSizeError,
    evaluation_cancel,
    evaluation_examples,
    evaluation_resize,
)


class EvaluationSizeForm(forms.Form):
    """How much a queued evaluation scores; the service checks the ranges."""

    examples = forms.IntegerField(min_value=1, help_text="Validation examples to score, from the first.")
    max_new_tokens = forms.IntegerField(min_value=1, label="Max new tokens", help_text="Per output, for every version.")


@admin.register(Evaluation)
class EvaluationAdmin(ProgressMixin, admin.ModelAdmin):
    list_display = ("id", "version", "origin", "status", "progress_list", "eta_list", "result", "finished_list")
    list_filter = ("status", "automatic")
    list_select_related = ("version",)
    actions = ("cancel_selected",)
    change_form_template = "admin/finetuning/evaluation/change_form.html"
    fields = (
        "version", "origin", "status", "queue_display", "progress_bar", "step_display", "eta_display", "error",
        "promotion_display", "decoding_display", "example_count", "example_ids", "snapshot", "worker",
        "heartbeat_at", "time_limit_seconds", "requested_by", "created_at", "started_at", "finished_at",
        "cancel_requested_at",
    )  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # from a version's "Evaluate" button, or after every successful job

    def has_change_permission(self, request, obj=None):
        return False

    def has_cancel_permission(self, request):
        return request.user.has_perm("finetuning.change_evaluation")

    def get_fields(self, request, obj=None):
        if obj is not None and obj.status != "queued":
            return [field for field in self.fields if field != "queue_display"]
        return self.fields

    @admin.display(description="started by")
    def origin(self, obj):
        if obj.automatic:
            return "after its job"
        return obj.requested_by.get_username() if obj.requested_by else "a curator"

    @admin.display(description="primary metric")
    def primary(self, obj):
        key = settings.PROMOTION_PRIMARY_METRIC
        score = next((s for s in obj.scores.all() if s.role == "candidate"), None)
        if score is None or key not in METRICS:
            return "–"
        return f"{METRICS[key].label} {metric_format(key, score.metrics.get(key))}"

    @admin.display(description="promotion", boolean=False)
    def promoted(self, obj):
        if not obj.promotion:
            return "–"
        return "activated" if obj.promotion.get("activated") else ("passed" if obj.promotion.get("passed") else "no")

    @admin.display(description="result")
    def result(self, obj):
        """The primary metric and the gate's verdict in one column: the list fits a 1366 px screen."""
        if obj.status != Evaluation.Status.SUCCEEDED:
            return "–"
        return format_html("{}<br><small>promotion: {}</small>", self.primary(obj), self.promoted(obj))

    @admin.display(description="promotion gate")
    def promotion_display(self, obj):
        return obj.promotion.get("reason", "–") if obj.promotion else "–"

    @admin.display(description="decoding")
    def decoding_display(self, obj):
        return format_html("<code>{}</code>", json_pretty(obj.decoding))

    @admin.display(description="examples")
    def example_count(self, obj):
        return len(obj.example_ids)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("requested_by").prefetch_related("scores__version")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        evaluation = self.get_object(request, object_id)
        extra = {"comparison": comparison_build(evaluation) if evaluation else None}
        if (
            evaluation is not None
            and evaluation.status == Evaluation.Status.QUEUED
            and self.has_cancel_permission(request)
        ):
            extra.update(self._sizing(evaluation))
        return super().change_view(request, object_id, form_url, {**extra, **(extra_context or {})})

    def _sizing(self, evaluation, form=None):
        """The sizing form of a queued evaluation, with how far it may go."""
        try:
            available = len(evaluation_examples(version=evaluation.version, limit=10**9))
        except EvaluationError:
            available = len(evaluation.example_ids)
        form = form or EvaluationSizeForm(
            initial={
                "examples": len(evaluation.example_ids),
                "max_new_tokens": evaluation.decoding.get("max_new_tokens"),
            }
        )
        return {"size_form": form, "size_available": available, "size_max_tokens": settings.GENERATE_MAX_NEW_TOKENS}

    def get_urls(self):
        return [
            path("<int:pk>/cancel/", self.admin_site.admin_view(self.cancel_view), name="finetuning_evaluation_cancel"),
            path("<int:pk>/size/", self.admin_site.admin_view(self.size_view), name="finetuning_evaluation_size"),
            *super().get_urls(),
        ]

    def _cancel(self, request, evaluation):
        try:
            evaluation = evaluation_cancel(evaluation=evaluation)
        except EvaluationError as exc:
            self.message_user(request, str(exc), messages.WARNING)
            return
        if evaluation.status == Evaluation.Status.CANCELLED:
            self.message_user(request, f"Evaluation {evaluation.pk} cancelled.", messages.SUCCESS)
        else:
            self.message_user(request, f"Evaluation {evaluation.pk} will stop at its next example.", messages.SUCCESS)

    @admin.action(description="Cancel the selected evaluations", permissions=["cancel"])
    def cancel_selected(self, request, queryset):
        for evaluation in queryset:
            self._cancel(request, evaluation)

    def cancel_view(self, request, pk):
        if request.method != "POST":
            return redirect("admin:finetuning_evaluation_change", pk)
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        self._cancel(request, get_object_or_404(Evaluation, pk=pk))
        return next_or(request, "admin:finetuning_evaluation_change", pk)

    def size_view(self, request, pk):
        evaluation = get_object_or_404(Evaluation.objects.select_related("version"), pk=pk)
        if request.method != "POST":
            return redirect("admin:finetuning_evaluation_change", pk)
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        form = EvaluationSizeForm(request.POST)
        if form.is_valid():
            try:
                evaluation = evaluation_resize(evaluation=evaluation, **form.cleaned_data)
            except EvaluationSizeError as exc:
                for field, reason in exc.errors.items():
                    form.add_error(field, reason)
            except EvaluationError as exc:
                self.message_user(request, str(exc), messages.WARNING)
                return redirect("admin:finetuning_evaluation_change", pk)
            else:
                self.message_user(
                    request,
                    f"Evaluation {evaluation.pk} will score {len(evaluation.example_ids)} examples with at most "
                    f"{evaluation.decoding['max_new_tokens']} new tokens each (time limit "
                    f"{evaluation.time_limit_seconds} s).",
                    messages.SUCCESS,
                )
                return redirect("admin:finetuning_evaluation_change", pk)
        # Invalid: the evaluation page again, with what was typed and why it was refused. Shown as a
        # GET: the read-only change view refuses POSTs, as nothing on it is editable.
        request.method = "GET"
        return self.change_view(request, str(pk), extra_context=self._sizing(evaluation, form))
