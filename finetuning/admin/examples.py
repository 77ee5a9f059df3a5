"""Training examples: attributes edited as fields, saved through the examples service; the
review status (draft / approved / rejected) set one by one or in bulk."""

from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from finetuning.forms import TrainingExampleForm
from finetuning.models import TrainingExample
from finetuning.services.examples import ExampleError, example_save, examples_review_set

REVIEW_ACTION_WORDS = {
    TrainingExample.Review.APPROVED: "approved",
    TrainingExample.Review.REJECTED: "rejected",
    TrainingExample.Review.DRAFT: "back to draft",
}


@admin.register(TrainingExample)
class TrainingExampleAdmin(admin.ModelAdmin):
    form = TrainingExampleForm
    list_display = ("name", "category", "dataset", "split", "source", "review_display", "updated_at")
    list_filter = ("dataset", "review", "split", "source", "category")
    search_fields = ("name", "category", "description")
    list_select_related = ("dataset",)
    list_per_page = 50
    readonly_fields = ("from_generation", "content_hash", "created_at", "updated_at")
    actions = ("approve_selected", "reject_selected", "draft_selected")
    change_form_template = "admin/finetuning/trainingexample/change_form.html"
    fieldsets = (
        (None, {"fields": ("dataset", "review", "split", "source")}),
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

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or not obj.generations.exists():
            return fieldsets
        (title, options), *rest = fieldsets
        return ((title, {**options, "fields": (*options["fields"], "from_generation")}), *rest)

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        if "review" in form.base_fields:
            # Left out of a post (a script, an older page): the example keeps its status, a new one is a draft.
            form.base_fields["review"].required = False
        return form

    @admin.display(description="review", ordering="review")
    def review_display(self, obj):
        colours = {
            TrainingExample.Review.APPROVED: "var(--message-success-bg)",
            TrainingExample.Review.REJECTED: "var(--message-error-bg)",
            TrainingExample.Review.DRAFT: "var(--darkened-bg)",
        }
        return format_html(
            '<span style="background:{};padding:1px 6px;border-radius:3px;color:var(--body-fg)">{}</span>',
            colours.get(obj.review, "transparent"),
            obj.get_review_display(),
        )

    @admin.display(description="from")  # the feedback it was made from
    def from_generation(self, obj):
        return format_html_join(
            ", ",
            '<a href="{}">generation {}</a> ({}, {})',
            (
                (
                    reverse("admin:inference_generation_change", args=[generation.pk]),
                    generation.pk,
                    generation.version_name or "?",
                    f"{generation.created_at:%Y-%m-%d %H:%M}",
                )
                for generation in obj.generations.all()
            ),
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
                review=form.cleaned_data.get("review") or None,
            )
        except ExampleError as exc:  # lost a race with another save: say so, write nothing
            self.message_user(request, f"Not saved: {exc}", messages.ERROR)

    def _review(self, request, queryset, review):
        selected = queryset.count()  # before: the list's own filter (e.g. review) may no longer match after
        changed = examples_review_set(examples=queryset, review=review)
        same = selected - changed
        message = f"{changed} example{'s' if changed != 1 else ''} {REVIEW_ACTION_WORDS[review]}"
        if same:
            message += f" ({same} already {TrainingExample.Review(review).label.lower()}, left as they were)"
        self.message_user(request, message + ".", messages.SUCCESS if changed else messages.WARNING)

    @admin.action(description="Approve the selected examples (they train)", permissions=["change"])
    def approve_selected(self, request, queryset):
        self._review(request, queryset, TrainingExample.Review.APPROVED)

    @admin.action(description="Reject the selected examples (they never train)", permissions=["change"])
    def reject_selected(self, request, queryset):
        self._review(request, queryset, TrainingExample.Review.REJECTED)

    @admin.action(
        description="Back to draft (train only where the dataset trains unreviewed ones)", permissions=["change"]
    )
    def draft_selected(self, request, queryset):
        self._review(request, queryset, TrainingExample.Review.DRAFT)
