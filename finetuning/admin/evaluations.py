"""Evaluations: a version scored beside the active version and the base model."""

from django.conf import settings
from django.contrib import admin
from django.utils.html import format_html

from finetuning.admin.display import ProgressMixin
from finetuning.comparison import comparison_build
from finetuning.forms import json_pretty
from finetuning.metrics import METRICS, metric_format
from finetuning.models import Evaluation


@admin.register(Evaluation)
class EvaluationAdmin(ProgressMixin, admin.ModelAdmin):
    list_display = ("id", "version", "status", "progress_bar", "step_display", "eta_display", "primary", "promoted",
                    "created_at", "finished_at")  # fmt: skip
    list_filter = ("status",)
    list_select_related = ("version",)
    change_form_template = "admin/finetuning/evaluation/change_form.html"
    fields = (
        "version", "status", "progress_bar", "step_display", "eta_display", "error", "promotion_display",
        "decoding_display", "example_count", "example_ids", "snapshot", "worker", "heartbeat_at",
        "time_limit_seconds", "requested_by", "created_at", "started_at", "finished_at",
    )  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # from a version's "Evaluate" button, or after every successful job

    def has_change_permission(self, request, obj=None):
        return False

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
        return super().get_queryset(request).prefetch_related("scores__version")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        evaluation = self.get_object(request, object_id)
        extra = {"comparison": comparison_build(evaluation) if evaluation else None}
        return super().change_view(request, object_id, form_url, {**extra, **(extra_context or {})})
