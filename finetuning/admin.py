"""Admin screens. Every write goes through a service, as the API and commands do."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from finetuning.charts import loss_chart
from finetuning.comparison import comparison_build
from finetuning.forms import FineTuneForm, TrainingExampleForm, json_pretty
from finetuning.hyperparameters import HyperparameterError
from finetuning.models import (
    Activation,
    Dataset,
    Evaluation,
    EvaluationScore,
    FineTuningJob,
    ModelVersion,
    TrainingExample,
)
from finetuning.selectors import activations_recent, active_version_get, datasets_with_counts, evaluation_latest
from finetuning.services.evaluations import EvaluationError, evaluation_start
from finetuning.services.examples import ExampleError, example_save
from finetuning.services.jobs import JobError, job_cancel, job_retrain, job_start
from finetuning.services.versions import (
    VersionError,
    rollback_target,
    version_activate,
    version_approval_withdraw,
    version_approve,
    version_rollback,
)


class JsonFieldsMixin:
    """Hyperparameters and metrics shown as readable JSON on job and version pages."""

    metrics_hidden = ()

    @admin.display(description="hyperparameters")
    def hyperparameters_display(self, obj):
        return format_html("<pre>{}</pre>", json_pretty(obj.hyperparameters))

    @admin.display(description="metrics")
    def metrics_display(self, obj):
        metrics = {key: value for key, value in (obj.metrics or {}).items() if key not in self.metrics_hidden}
        return format_html("<pre>{}</pre>", json_pretty(metrics))


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("name", "example_count", "train_count", "validation_count", "unassigned_count", "created_at")
    search_fields = ("name",)
    readonly_fields = (
        "example_count",
        "train_count",
        "validation_count",
        "unassigned_count",
        "created_at",
        "updated_at",
    )
    change_form_template = "admin/finetuning/dataset/change_form.html"

    def get_queryset(self, request):
        return datasets_with_counts()

    @admin.display(description="examples", ordering="example_count")
    def example_count(self, obj):
        return getattr(obj, "example_count", 0)

    @admin.display(description="train", ordering="train_count")
    def train_count(self, obj):
        return getattr(obj, "train_count", 0)

    @admin.display(description="validation", ordering="validation_count")
    def validation_count(self, obj):
        return getattr(obj, "validation_count", 0)

    @admin.display(description="unassigned", ordering="unassigned_count")
    def unassigned_count(self, obj):
        return getattr(obj, "unassigned_count", 0)

    def get_urls(self):
        return [
            path(
                "<int:pk>/finetune/",
                self.admin_site.admin_view(self.finetune_view),
                name="finetuning_dataset_finetune",
            ),
            *super().get_urls(),
        ]

    def finetune_view(self, request, pk):
        if not request.user.has_perm("finetuning.add_finetuningjob"):
            raise PermissionDenied
        dataset = get_object_or_404(datasets_with_counts(), pk=pk)
        form = FineTuneForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                job = job_start(dataset=dataset, hyperparameters=form.cleaned_data, requested_by=request.user)
            except HyperparameterError as exc:
                for key, message in exc.errors.items():
                    form.add_error(key if key in form.fields else None, message)
            except JobError as exc:
                form.add_error(None, str(exc))
            else:
                self.message_user(request, f"Fine-tuning job {job.pk} queued on {dataset.name}.", messages.SUCCESS)
                return redirect("admin:finetuning_finetuningjob_change", job.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Start fine-tuning on {dataset.name}",
            "dataset": dataset,
            "form": form,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/finetuning/dataset/finetune.html", context)


@admin.register(TrainingExample)
class TrainingExampleAdmin(admin.ModelAdmin):
    form = TrainingExampleForm
    list_display = ("name", "category", "dataset", "split", "source", "updated_at")
    list_filter = ("dataset", "split", "source", "category")
    search_fields = ("name", "category", "description")
    list_select_related = ("dataset",)
    list_per_page = 50
    readonly_fields = ("content_hash", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("dataset", "split", "source")}),
        (
            "Product attributes",
            {
                "fields": (
                    "name",
                    "category",
                    "color",
                    "brand",
                    "audience",
                    "price",
                    "currency",
                    "features",
                    "keywords",
                    "other_attributes",
                )
            },
        ),
        ("Target description", {"fields": ("description",)}),
        ("Record", {"fields": ("content_hash", "created_at", "updated_at"), "classes": ("collapse",)}),
    )

    def save_model(self, request, obj, form, change):
        try:
            example_save(
                example=obj,
                dataset=form.cleaned_data["dataset"],
                attributes=form.attributes(),
                description=form.cleaned_data["description"],
                split=form.cleaned_data["split"],
                source=form.cleaned_data["source"],
            )
        except ExampleError as exc:  # lost a race with another save: say so, write nothing
            self.message_user(request, f"Not saved: {exc}", messages.ERROR)


def _chart(train_history, validation_history):
    return loss_chart([("train loss", "#417690", train_history), ("validation loss", "#d9534f", validation_history)])


def _duration(seconds):
    if seconds is None:
        return "–"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


class ProgressMixin:
    """Progress, step and time left of a long-running row (a job, an evaluation)."""

    @admin.display(description="progress")
    def progress_bar(self, obj):
        return format_html(
            '<progress value="{}" max="100" style="width:10em"></progress> {}%',
            round(obj.progress * 100),
            round(obj.progress * 100),
        )

    @admin.display(description="step")
    def step_display(self, obj):
        return f"{obj.step} / {obj.total_steps}" if obj.total_steps else "–"

    @admin.display(description="time left")
    def eta_display(self, obj):
        if obj.status != "running":
            return "–"
        return f"about {_duration(obj.eta_seconds)}" if obj.eta_seconds is not None else "estimating…"


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
        return _chart(obj.loss_history, obj.validation_history) or "no steps yet"

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
        return _duration(obj.wall_seconds)

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


@admin.register(ModelVersion)
class ModelVersionAdmin(JsonFieldsMixin, admin.ModelAdmin):
    metrics_hidden = ("loss_history", "validation_history")  # drawn as a chart
    list_display = (
        "name", "kind", "is_active", "released", "base_model", "validation_loss", "rouge_l", "created_at",
        "activated_at",
    )  # fmt: skip
    list_filter = ("kind", "is_active")
    search_fields = ("name",)
    actions = ("activate_selected",)
    change_form_template = "admin/finetuning/modelversion/change_form.html"
    change_list_template = "admin/finetuning/modelversion/change_list.html"
    fields = (
        "name",
        "kind",
        "is_active",
        "activated_at",
        "released",
        "approved_at",
        "approved_by",
        "base_model",
        "artifact_path",
        "sha256",
        "prompt_format_version",
        "job",
        "snapshot_display",
        "hyperparameters_display",
        "loss_chart",
        "metrics_display",
        "created_at",
    )
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # versions come from fine-tuning jobs and prepare_base_model

    def has_activate_permission(self, request):
        return request.user.has_perm("finetuning.activate_modelversion")

    @admin.display(description="released to clients", boolean=True)
    def released(self, obj):
        return obj.is_released

    @admin.display(description="data snapshot")
    def snapshot_display(self, obj):
        if obj.snapshot is None:
            return "–"
        return format_html(
            "{}: {} train, {} validation examples, sha256 <code>{}</code>",
            obj.snapshot.path,
            obj.snapshot.train_examples,
            obj.snapshot.validation_examples,
            obj.snapshot.sha256,
        )

    @admin.display(description="loss")
    def loss_chart(self, obj):
        metrics = obj.metrics or {}
        return _chart(metrics.get("loss_history") or [], metrics.get("validation_history") or []) or "–"

    @admin.display(description="validation loss")
    def validation_loss(self, obj):
        value = (obj.metrics or {}).get("validation_loss")
        return f"{value:.4f}" if isinstance(value, (int, float)) else "–"

    def get_queryset(self, request):
        # The ROUGE-L column: every version's succeeded scores in one query, newest first.
        succeeded = EvaluationScore.objects.filter(evaluation__status=Evaluation.Status.SUCCEEDED).order_by(
            "-evaluation__created_at"
        )
        return super().get_queryset(request).prefetch_related(Prefetch("scores", succeeded, to_attr="scores_succeeded"))

    @admin.display(description="ROUGE-L")
    def rouge_l(self, obj):
        scores = getattr(obj, "scores_succeeded", None) or []
        value = scores[0].metrics.get("rouge_l") if scores else None
        return f"{value:.2f}" if isinstance(value, (int, float)) else "–"

    def change_view(self, request, object_id, form_url="", extra_context=None):
        version = self.get_object(request, object_id)
        extra = {}
        if version is not None:
            evaluation = evaluation_latest(version=version)
            extra = {
                "comparison": comparison_build(evaluation) if evaluation else None,
                "evaluations": version.evaluations.all()[:10],
                "rollback_target": rollback_target() if version.is_active else None,
                "can_activate": self.has_activate_permission(request),
                "can_evaluate": request.user.has_perm("finetuning.add_evaluation") and version.snapshot_id,
            }
        return super().change_view(request, object_id, form_url, {**extra, **(extra_context or {})})

    def changelist_view(self, request, extra_context=None):
        extra = {
            "rollback_target": rollback_target(),
            "active_version": active_version_get(),
            "activations": activations_recent(10),
            "can_activate": self.has_activate_permission(request),
        }
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    @admin.action(description="Activate the selected version…", permissions=["activate"])
    def activate_selected(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to activate.", messages.ERROR)
            return None
        return redirect("admin:finetuning_modelversion_activate", queryset.get().pk)

    def get_urls(self):
        return [
            path(
                "<int:pk>/activate/",
                self.admin_site.admin_view(self.activate_view),
                name="finetuning_modelversion_activate",
            ),
            path(
                "<int:pk>/evaluate/",
                self.admin_site.admin_view(self.evaluate_view),
                name="finetuning_modelversion_evaluate",
            ),
            path(
                "<int:pk>/retrain/",
                self.admin_site.admin_view(self.retrain_view),
                name="finetuning_modelversion_retrain",
            ),
            path(
                "<int:pk>/approval/",
                self.admin_site.admin_view(self.approval_view),
                name="finetuning_modelversion_approval",
            ),
            path("rollback/", self.admin_site.admin_view(self.rollback_view), name="finetuning_modelversion_rollback"),
            *super().get_urls(),
        ]

    def approval_view(self, request, pk):
        """Approve a version for clients (any API key may then ask for it by name), or withdraw that."""
        if request.method != "POST":
            return redirect("admin:finetuning_modelversion_change", pk)
        if not self.has_activate_permission(request):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=pk)
        if request.POST.get("approve") == "yes":
            version_approve(version=version, user=request.user)
            self.message_user(
                request, f"{version.name} is approved: every API key may generate with it by name.", messages.SUCCESS
            )
        else:
            version_approval_withdraw(version=version)
            note = " It stays served to everyone while it is active." if version.is_active else ""
            self.message_user(
                request,
                f"{version.name} is no longer approved: only keys with the models:unreleased scope may use it.{note}",
                messages.SUCCESS,
            )
        return redirect("admin:finetuning_modelversion_change", pk)

    def retrain_view(self, request, pk):
        if request.method != "POST":
            return redirect("admin:finetuning_modelversion_change", pk)
        if not request.user.has_perm("finetuning.add_finetuningjob"):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=pk)
        try:
            job = job_retrain(version=version, requested_by=request.user)
        except JobError as exc:
            self.message_user(request, f"Not retrained: {exc}", messages.ERROR)
            return redirect("admin:finetuning_modelversion_change", pk)
        self.message_user(request, f"Job {job.pk} retrains {version.name} on its own snapshot.", messages.SUCCESS)
        return redirect("admin:finetuning_finetuningjob_change", job.pk)

    def evaluate_view(self, request, pk):
        if request.method != "POST":
            return redirect("admin:finetuning_modelversion_change", pk)
        if not request.user.has_perm("finetuning.add_evaluation"):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=pk)
        try:
            evaluation = evaluation_start(version=version, requested_by=request.user)
        except EvaluationError as exc:
            self.message_user(request, f"Not evaluated: {exc}", messages.ERROR)
            return redirect("admin:finetuning_modelversion_change", pk)
        self.message_user(request, f"Evaluation {evaluation.pk} of {version.name} queued.", messages.SUCCESS)
        return redirect("admin:finetuning_evaluation_change", evaluation.pk)

    def activate_view(self, request, pk):
        """A confirmation that shows how this version compares with the active one;
        activating needs the confirm button and the activate permission."""
        if not self.has_activate_permission(request):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=pk)
        if request.method == "POST" and request.POST.get("confirm") == "yes":
            try:
                version_activate(
                    version=version,
                    user=request.user,
                    reason=request.POST.get("reason", "")[:1000],
                    kind=Activation.Kind.MANUAL,
                    evaluation=evaluation_latest(version=version),
                )
            except VersionError as exc:
                self.message_user(request, f"Not activated: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{version.name} is now the active version.", messages.SUCCESS)
            return redirect("admin:finetuning_modelversion_change", pk)
        evaluation = evaluation_latest(version=version)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Activate {version.name}?",
            "version": version,
            "active": active_version_get(),
            "comparison": comparison_build(evaluation) if evaluation else None,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/finetuning/modelversion/activate.html", context)

    def rollback_view(self, request):
        if request.method != "POST":
            return redirect("admin:finetuning_modelversion_changelist")
        if not self.has_activate_permission(request):
            raise PermissionDenied
        try:
            version = version_rollback(user=request.user, reason=request.POST.get("reason", "")[:1000])
        except VersionError as exc:
            self.message_user(request, f"Not rolled back: {exc}", messages.ERROR)
            return redirect("admin:finetuning_modelversion_changelist")
        self.message_user(request, f"Rolled back: {version.name} is the active version again.", messages.SUCCESS)
        return redirect("admin:finetuning_modelversion_change", version.pk)


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
        from django.conf import settings

        from finetuning.metrics import METRICS, metric_format

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


@admin.register(Activation)
class ActivationAdmin(admin.ModelAdmin):
    list_display = ("created_at", "version", "previous", "kind", "user", "reason")
    list_filter = ("kind",)
    list_select_related = ("version", "previous", "user")
    readonly_fields = ("created_at", "version", "previous", "kind", "user", "reason", "evaluation")

    def has_add_permission(self, request):
        return False  # activations are recorded by activating

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # the history stays whole
