"""Fine-tuning jobs: read-only pages that follow a job, and cancelling."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils.html import format_html

from finetuning.admin.display import JsonFieldsMixin, ProgressMixin, duration_display, loss_chart_display
from finetuning.forms import json_pretty
from finetuning.models import FineTuningJob
from finetuning.services.jobs import JobError, job_cancel


@admin.register(FineTuningJob)
class FineTuningJobAdmin(ProgressMixin, JsonFieldsMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "dataset",
        "status",
        "progress_bar",
        "step_display",
        "eta_display",
        "created_at",
        "finished_at",
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

    @admin.display(description="loss")
    def loss_chart(self, obj):
        return loss_chart_display(obj.loss_history, obj.validation_history) or "no steps yet"

    @admin.display(description="validation loss")
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
        return redirect("admin:finetuning_finetuningjob_change", pk)
