"""Datasets: their counts and settings. Importing and exporting (ImportExportMixin) and
starting fine-tuning (FineTuneMixin) are screens of their own."""

from urllib.parse import urlencode

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from finetuning.admin.finetune import FineTuneMixin
from finetuning.admin.importing import ImportExportMixin
from finetuning.models import Dataset
from finetuning.selectors import datasets_with_counts


@admin.register(Dataset)
class DatasetAdmin(ImportExportMixin, FineTuneMixin, admin.ModelAdmin):
    # No filter column: it would push the counts off a 1366 px screen.
    list_display = ("name", "example_count", "train_count", "validation_count", "unassigned_count",
                    "feedback_count", "review_display", "train_unreviewed", "created_at")  # fmt: skip
    search_fields = ("name",)
    fields = (
        "name",
        "description",
        "train_unreviewed",
        "example_count",
        "train_count",
        "validation_count",
        "unassigned_count",
        "feedback_count",
        "review_summary",
        "created_at",
        "updated_at",
    )
    readonly_fields = (
        "example_count",
        "train_count",
        "validation_count",
        "unassigned_count",
        "feedback_count",
        "review_summary",
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

    @admin.display(description="from feedback", ordering="feedback_count")
    def feedback_count(self, obj):
        count = getattr(obj, "feedback_count", 0)
        if not count or obj.pk is None:
            return count
        url = reverse_examples(dataset=obj.pk, source="feedback")
        return format_html('<a href="{}">{}</a>', url, count)

    def _review_counts(self, obj):
        approved, draft, rejected = (getattr(obj, f"{name}_count", 0) for name in ("approved", "draft", "rejected"))
        return approved, draft, rejected, approved + (draft if obj.train_unreviewed else 0)

    @admin.display(description="approved / draft / rejected")
    def review_display(self, obj):
        approved, draft, rejected, trains = self._review_counts(obj)
        return format_html(
            '<span style="white-space:nowrap"><a href="{}">{}</a> / <a href="{}">{}</a> / <a href="{}">{}</a> '
            '<span class="quiet">({} train)</span></span>',
            reverse_examples(dataset=obj.pk, review="approved"),
            approved,
            reverse_examples(dataset=obj.pk, review="draft"),
            draft,
            reverse_examples(dataset=obj.pk, review="rejected"),
            rejected,
            trains,
        )

    @admin.display(description="review")
    def review_summary(self, obj):
        if obj.pk is None:
            return "–"
        approved, draft, rejected, trains = self._review_counts(obj)
        return format_html(
            '<a href="{}">{} approved</a>, <a href="{}">{} draft</a>, <a href="{}">{} rejected</a>: {} train '
            "(approved{})",
            reverse_examples(dataset=obj.pk, review="approved"),
            approved,
            reverse_examples(dataset=obj.pk, review="draft"),
            draft,
            reverse_examples(dataset=obj.pk, review="rejected"),
            rejected,
            trains,
            " and drafts" if obj.train_unreviewed else " only",
        )


def reverse_examples(**filters):
    """The examples list filtered by ``filters`` (dataset id, review, source)."""
    query = {("dataset__id__exact" if key == "dataset" else f"{key}__exact"): value for key, value in filters.items()}
    return f"{reverse('admin:finetuning_trainingexample_changelist')}?{urlencode(query)}"
