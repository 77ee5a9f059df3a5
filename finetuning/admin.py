"""Admin screens. Every write goes through a service, as the API and commands do."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from finetuning.forms import FineTuneForm, TrainingExampleForm, json_pretty
from finetuning.hyperparameters import HyperparameterError
from finetuning.models import Dataset, FineTuningJob, ModelVersion, TrainingExample
from finetuning.selectors import datasets_with_counts
from finetuning.services.examples import ExampleError, example_save
from finetuning.services.jobs import JobError, job_start
from finetuning.services.versions import VersionError, version_activate


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


@admin.register(FineTuningJob)
class FineTuningJobAdmin(JsonFieldsMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "dataset",
        "status",
        "progress_bar",
        "step_display",
        "created_at",
        "finished_at",
        "version_link",
    )
    list_filter = ("status", "dataset")
    list_select_related = ("dataset",)
    change_form_template = "admin/finetuning/finetuningjob/change_form.html"
    fields = (
        "dataset",
        "status",
        "progress_bar",
        "step_display",
        "error",
        "version_link",
        "base_model",
        "hyperparameters_display",
        "metrics_display",
        "requested_by",
        "created_at",
        "started_at",
        "finished_at",
    )
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # jobs start from a dataset's "Start fine-tuning" button

    def has_change_permission(self, request, obj=None):
        return False  # read-only: jobs change only through their services

    def has_delete_permission(self, request, obj=None):
        return False

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

    @admin.display(description="model version")
    def version_link(self, obj):
        version = getattr(obj, "model_version", None)
        if version is None:
            return "–"
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:finetuning_modelversion_change", args=[version.pk]), version.name
        )


@admin.register(ModelVersion)
class ModelVersionAdmin(JsonFieldsMixin, admin.ModelAdmin):
    metrics_hidden = ("loss_history",)  # long; a chart comes with evaluation
    list_display = ("name", "kind", "is_active", "base_model", "validation_loss", "created_at", "activated_at")
    list_filter = ("kind", "is_active")
    search_fields = ("name",)
    actions = ("activate_selected",)
    change_form_template = "admin/finetuning/modelversion/change_form.html"
    fields = (
        "name",
        "kind",
        "is_active",
        "activated_at",
        "base_model",
        "artifact_path",
        "sha256",
        "prompt_format_version",
        "job",
        "hyperparameters_display",
        "metrics_display",
        "created_at",
    )
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # versions come from fine-tuning jobs and prepare_base_model

    @admin.display(description="validation loss")
    def validation_loss(self, obj):
        value = (obj.metrics or {}).get("validation_loss")
        return f"{value:.4f}" if isinstance(value, (int, float)) else "–"

    def _activate(self, request, version):
        try:
            version_activate(version=version)
        except VersionError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            self.message_user(request, f"{version.name} is now the active version.", messages.SUCCESS)

    @admin.action(description="Activate the selected version", permissions=["change"])
    def activate_selected(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to activate.", messages.ERROR)
            return
        self._activate(request, queryset.get())

    def get_urls(self):
        return [
            path(
                "<int:pk>/activate/",
                self.admin_site.admin_view(self.activate_view),
                name="finetuning_modelversion_activate",
            ),
            *super().get_urls(),
        ]

    def activate_view(self, request, pk):
        if request.method != "POST":
            return redirect("admin:finetuning_modelversion_change", pk)
        if not self.has_change_permission(request):
            raise PermissionDenied
        self._activate(request, get_object_or_404(ModelVersion, pk=pk))
        return redirect("admin:finetuning_modelversion_change", pk)
