"""Datasets: their counts and settings. Importing and exporting (ImportExportMixin) and
starting fine-tuning (FineTuneMixin) are screens of their own."""

from django.contrib import admin

from finetuning.admin.finetune import FineTuneMixin
from finetuning.admin.importing import ImportExportMixin
from finetuning.models import Dataset
from finetuning.selectors import datasets_with_counts


@admin.register(Dataset)
class DatasetAdmin(ImportExportMixin, FineTuneMixin, admin.ModelAdmin):
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
