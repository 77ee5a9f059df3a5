"""Fine-tuning jobs: read-only pages that follow a job, and cancelling."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from finetuning.admin.display import JsonFieldsMixin, ProgressMixin, duration_display, loss_chart_display, next_or
from finetuning.forms import json_pretty
from finetuning.models import FineTuningJob
from finetuning.services.jobs import JobError, job_cancel


def _examples_seen(job):
    """Examples a job's optimiser steps can have gone through (steps × batch × accumulation);
    None when not recorded. Below the examples kept, a max_steps run ended before one epoch."""
    steps = (job.metrics or {}).get("steps")
    hp = job.hyperparameters or {}
    if not steps or not hp.get("batch_size"):
        return None
    return steps * hp["batch_size"] * hp.get("gradient_accumulation_steps", 1)


@admin.register(FineTuningJob)
class FineTuningJobAdmin(ProgressMixin, JsonFieldsMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "dataset",
        "status_list",
        "progress_list",
        "eta_list",
        "finished_list",
        "version_link",
    )
    list_filter = ("status", "dataset")
    list_select_related = ("dataset", "model_version")
    actions = ("cancel_selected",)
    change_form_template = "admin/finetuning/finetuningjob/change_form.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "dataset",
                    "status",
                    "queue_display",
                    "examples_display",
                    "progress_bar",
                    "step_display",
                    "eta_display",
                    "loss_chart",
                    "validation_loss",
                    "error",
                    "version_link",
                )
            },
        ),
        ("Recipe", {"fields": ("base_model", "snapshot_display", "hyperparameters_display")}),
        (
            "Run",
            {
                "fields": (
                    "metrics_display",
                    "environment_display",
                    "worker",
                    "heartbeat_at",
                    "time_limit_seconds",
                    "wall_time",
                    "requested_by",
                    "created_at",
                    "started_at",
                    "finished_at",
                    "cancel_requested_at",
                )
            },
        ),
    )
    readonly_fields = tuple(field for _, options in fieldsets for field in options["fields"])

    def has_add_permission(self, request):
        return False  # jobs start from a dataset's "Start fine-tuning" button

    def has_change_permission(self, request, obj=None):
        return False  # read-only: jobs change only through their services

    def has_delete_permission(self, request, obj=None):
        return False

    def has_cancel_permission(self, request):
        return request.user.has_perm("finetuning.change_finetuningjob")

    def get_fieldsets(self, request, obj=None):
        if obj is not None and obj.status != "queued":
            return [
                (name, {**options, "fields": [f for f in options["fields"] if f != "queue_display"]})
                for name, options in self.fieldsets
            ]
        return self.fieldsets

    @staticmethod
    def _example_counts(obj):
        """(trained on, skipped, truncated) from the job's metrics; None for a count it does not have."""
        metrics = obj.metrics or {}
        return metrics.get("train_examples"), metrics.get("skipped_examples"), metrics.get("truncated_examples")

    @admin.display(description="examples")
    def examples_display(self, obj):
        trained, skipped, truncated = self._example_counts(obj)
        if trained is None:
            planned = obj.snapshot.train_examples if obj.snapshot else None
            if planned is None:
                return "–"
            return (
                f"{planned} train examples in its snapshot; trained on, skipped and truncated are counted as it trains"
            )
        parts = [
            format_html("<strong>{}</strong> trained on", trained),
            format_html("<strong>{}</strong> skipped", skipped or 0),
        ]
        if truncated is not None:
            parts.append(format_html("<strong>{}</strong> truncated", truncated))
        line = format_html_join(" · ", "{}", ((part,) for part in parts))
        seen = _examples_seen(obj)
        if seen is not None and seen < trained:
            line = format_html(
                "{} <small>(its {} steps of {} reached {} of them: max_steps ended it first)</small>",
                line,
                obj.metrics.get("steps"),
                seen // max(obj.metrics.get("steps") or 1, 1),
                seen,
            )
        if skipped:
            max_seq_length = (obj.hyperparameters or {}).get("max_seq_length")
            return format_html(
                '<ul class="messagelist" style="margin:0"><li class="warning">{}. {} examples did not fit in '
                "max_seq_length {} and were left out: this version never saw them.</li></ul>",
                line,
                skipped,
                max_seq_length,
            )
        return line

    @admin.display(description="status", ordering="status")
    def status_list(self, obj):
        """The status, and under it the examples left out of training, when any were."""
        _, skipped, _ = self._example_counts(obj)
        if skipped:
            return format_html(
                '{}<br><strong style="color:var(--error-fg)">{} examples skipped</strong>',
                obj.get_status_display(),
                skipped,
            )
        return obj.get_status_display()

    @admin.display(description="loss")
    def loss_chart(self, obj):
        return loss_chart_display(obj.loss_history, obj.validation_history) or "no steps yet"

    @admin.display(description="validation loss (training)")
    def validation_loss(self, obj):
        if obj.validation_history:
            return f"{obj.validation_history[-1][1]:.4f} (step {obj.validation_history[-1][0]})"
        if obj.snapshot and not obj.snapshot.validation_examples:
            return obj.snapshot.note
        return "–"

    @admin.display(description="data snapshot")
    def snapshot_display(self, obj):
        snapshot = obj.snapshot
        if snapshot is None:
            return "–"
        return format_html(
            "{} examples: {} train, {} validation<br>{}<br><code>{}</code> sha256 <code>{}</code>",
            snapshot.examples,
            snapshot.train_examples,
            snapshot.validation_examples,
            snapshot.note,
            snapshot.path,
            snapshot.sha256,
        )

    @admin.display(description="environment")
    def environment_display(self, obj):
        return format_html("<pre>{}</pre>", json_pretty(obj.environment))

    @admin.display(description="wall time")
    def wall_time(self, obj):
        return duration_display(obj.wall_seconds)

    @admin.display(description="model version")
    def version_link(self, obj):
        version = getattr(obj, "model_version", None)
        if version is None:
            return "–"
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:finetuning_modelversion_change", args=[version.pk]), version.name
        )

    def _cancel(self, request, job):
        """Cancel one job, saying what happened."""
        try:
            job = job_cancel(job=job)
        except JobError as exc:
            self.message_user(request, str(exc), messages.WARNING)
            return
        if job.status == FineTuningJob.Status.CANCELLED:
            self.message_user(request, f"Job {job.pk} cancelled.", messages.SUCCESS)
        else:
            self.message_user(request, f"Job {job.pk} will stop at its next training step.", messages.SUCCESS)

    @admin.action(description="Cancel the selected jobs", permissions=["cancel"])
    def cancel_selected(self, request, queryset):
        for job in queryset:
            self._cancel(request, job)

    def get_urls(self):
        return [
            path(
                "<int:pk>/cancel/",
                self.admin_site.admin_view(self.cancel_view),
                name="finetuning_finetuningjob_cancel",
            ),
            *super().get_urls(),
        ]

    def cancel_view(self, request, pk):
        if request.method != "POST":
            return redirect("admin:finetuning_finetuningjob_change", pk)
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        self._cancel(request, get_object_or_404(FineTuningJob, pk=pk))
        return next_or(request, "admin:finetuning_finetuningjob_change", pk)
