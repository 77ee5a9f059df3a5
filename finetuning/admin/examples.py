"""Training examples: attributes edited as fields, saved through the examples service."""

from django.contrib import admin, messages

from finetuning.forms import TrainingExampleForm
from finetuning.models import TrainingExample
from finetuning.services.examples import ExampleError, example_save


@admin.register(TrainingExample)
class TrainingExampleAdmin(admin.ModelAdmin):
    form = TrainingExampleForm
    list_display = ("name", "category", "dataset", "split", "source", "updated_at")
    list_filter = ("dataset", "split", "source", "category")
    search_fields = ("name", "category", "description")
    list_select_related = ("dataset",)
    list_per_page = 50
    readonly_fields = ("content_hash", "created_at", "updated_at")
    change_form_template = "admin/finetuning/trainingexample/change_form.html"
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
