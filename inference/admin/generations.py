"""The generation log: what the API, the OpenAI-compatible routes and the playground
generated, newest first. A curator rates an output, corrects its text and adds it to a
dataset as a training example; every write goes through services.feedback."""

import json

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator

from finetuning.models import Dataset
from inference.models import Generation
from inference.services.feedback import (
    FeedbackError,
    generation_correct,
    generation_example_add,
    generation_product,
    generation_rate,
)
from inference.services.generation_log import input_product

ADD_EXAMPLE = "_add_example"  # the submit button that also adds the generation to a dataset


class GenerationFeedbackForm(forms.ModelForm):
    """The curator's part of a generation page: rating, note, corrected text, and the dataset
    an example goes to. The text starts as the output, so that correcting means editing it."""

    rating = forms.ChoiceField(
        choices=[("", "Not rated"), *Generation.Rating.choices],
        required=False,
        widget=forms.RadioSelect,
    )
    corrected_output = forms.CharField(
        label="Corrected text",
        required=False,
        widget=forms.Textarea(attrs={"rows": 6, "cols": 100}),
        help_text="Edit the output to correct it; an example added to a dataset gets this text.",
    )
    dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.all(),
        required=False,
        help_text="Where “Add to dataset as training example” puts it: a draft with source feedback.",
    )

    class Meta:
        model = Generation
        fields = ("rating", "rating_note", "corrected_output")
        widgets = {"rating_note": forms.Textarea(attrs={"rows": 2, "cols": 100})}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        generation = self.instance
        self.initial["corrected_output"] = generation.corrected_output or generation.output

    def clean(self):
        data = super().clean()
        if data.get("rating_note", "").strip() and not data.get("rating"):
            self.add_error("rating", "Rate it good or bad to keep a note.")
        if ADD_EXAMPLE in self.data and "dataset" in self.fields and not data.get("dataset"):
            self.add_error("dataset", "Choose the dataset the example goes to.")
        return data


def _is_product(generation):
    try:
        generation_product(generation)
    except FeedbackError:
        return False
    return True


class RatingFilter(admin.SimpleListFilter):
    title = "rating"
    parameter_name = "rating"

    def lookups(self, request, model_admin):
        return [*Generation.Rating.choices, ("none", "Not rated")]

    def queryset(self, request, queryset):
        if self.value() == "none":
            return queryset.filter(rating="")
        if self.value() in Generation.Rating.values:
            return queryset.filter(rating=self.value())
        return queryset


class HasExampleFilter(admin.SimpleListFilter):
    title = "has example"
    parameter_name = "has_example"

    def lookups(self, request, model_admin):
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(example__isnull=False)
        if self.value() == "no":
            return queryset.filter(example__isnull=True)
        return queryset


class ErrorFilter(admin.SimpleListFilter):
    title = "outcome"
    parameter_name = "outcome"

    def lookups(self, request, model_admin):
        return [("answered", "Answered"), ("failed", "Failed (timeout, client left)")]

    def queryset(self, request, queryset):
        if self.value() == "answered":
            return queryset.filter(error="")
        if self.value() == "failed":
            return queryset.exclude(error="")
        return queryset


def _pre(text, empty="(empty)"):
    return format_html('<pre class="generation-text">{}</pre>', text) if text else empty


def _table(rows):
    if not rows:
        return "–"
    return format_html(
        '<table class="generation-facts"><tbody>{}</tbody></table>',
        format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
    )


def _value(value):
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "–"
    return "–" if value is None else value


@admin.register(Generation)
class GenerationAdmin(admin.ModelAdmin):
    form = GenerationFeedbackForm
    # Narrow columns, two lines each where it helps: the whole row fits 1366 px beside the filters.
    list_display = ("created_display", "source_display", "caller", "input_summary", "output_summary",
                    "result_display", "rating_display", "example_link")  # fmt: skip
    list_display_links = ("created_display",)
    list_filter = (
        "route",
        "version",
        "api_key",
        "user",
        ("created_at", admin.DateFieldListFilter),
        RatingFilter,
        HasExampleFilter,
        ErrorFilter,
    )
    search_fields = ("input", "output", "corrected_output", "prompt")
    search_help_text = "Searches the input (attributes, prompt, messages), the output and the corrected text."
    date_hierarchy = "created_at"
    list_select_related = ("api_key", "user", "example", "version")
    list_per_page = 50
    change_form_template = "admin/inference/generation/change_form.html"
    change_list_template = "admin/inference/generation/change_list.html"
    readonly = ("summary", "input_display", "prompt_display", "output_display", "parameters_display",
                "timings_display", "rated_display", "example_display")  # fmt: skip
    fieldsets = (
        (None, {"fields": ("summary",)}),
        ("Input", {"fields": ("input_display", "prompt_display")}),
        ("Output", {"fields": ("output_display",)}),
        ("Parameters and timings", {"fields": ("parameters_display", "timings_display")}),
        ("Feedback", {"fields": ("rating", "rating_note", "rated_display", "corrected_output")}),
        ("Training example", {"fields": ("example_display", "dataset")}),
    )

    def get_fieldsets(self, request, obj=None):
        if obj is None or (obj.example_id is None and _is_product(obj)):
            return self.fieldsets
        # Linked already, or not a product: no dataset to choose, the example row says why.
        return (*self.fieldsets[:-1], ("Training example", {"fields": ("example_display",)}))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        obj = self.get_object(request, object_id)
        context = {
            "title": f"Generation {object_id}",
            "can_add_example": obj is not None and obj.example_id is None and _is_product(obj),
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, context)

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and not self.has_change_permission(request, obj):
            return (*self.readonly, "rating", "rating_note", "corrected_output", "dataset")
        return self.readonly

    def has_add_permission(self, request):
        return False  # the log is written by generating, never by hand

    def changelist_view(self, request, extra_context=None):
        return super().changelist_view(
            request,
            {
                "title": "Generation log",
                "retention_days": settings.GENERATION_LOG_RETENTION_DAYS,
                **(extra_context or {}),
            },
        )

    # --- the list -------------------------------------------------------------------------

    @admin.display(description="when", ordering="created_at")
    def created_display(self, obj):
        return format_html("{}<br>{}", f"{obj.created_at:%Y-%m-%d}", f"{obj.created_at:%H:%M:%S}")

    @admin.display(description="route, version", ordering="route")
    def source_display(self, obj):
        return format_html(
            '<span title="{}">{}</span><br><span class="quiet">{}</span>',
            obj.get_route_display(),
            obj.route,
            obj.version_name or "–",
        )

    @admin.display(description="caller")
    def caller(self, obj):
        if obj.api_key_id is not None:
            return format_html("key {}", Truncator(obj.api_key.name).chars(24))
        if obj.user_id is not None:
            return obj.user.get_username()
        return "anonymous"

    @admin.display(description="input")
    def input_summary(self, obj):
        asked = obj.input or {}
        product = input_product(asked)
        if product is not None:
            return format_html(
                '<span class="quiet">product</span><br>{}', Truncator(product.get("name", "?")).chars(50)
            )
        if "messages" in asked:
            last = (asked["messages"] or [{}])[-1]
            return format_html(
                '<span class="quiet">chat</span><br>{}', Truncator(str(last.get("content", ""))).chars(50)
            )
        return format_html('<span class="quiet">prompt</span><br>{}', Truncator(str(asked.get("prompt", ""))).chars(50))

    @admin.display(description="output")
    def output_summary(self, obj):
        if obj.error and not obj.output:
            return format_html('<span class="generation-error">failed: {}</span>', Truncator(obj.error).chars(60))
        return Truncator(obj.corrected_output or obj.output).chars(90) or "–"

    @admin.display(description="finish, tokens, ms", ordering="total_ms")
    def result_display(self, obj):
        return format_html(
            '{}<br><span class="quiet" title="prompt tokens → generated tokens, milliseconds">{} → {}, {} ms</span>',
            obj.finish_reason or "–",
            obj.prompt_tokens,
            obj.completion_tokens,
            "–" if obj.total_ms is None else f"{obj.total_ms:,.0f}",
        )

    @admin.display(description="rating", ordering="rating")
    def rating_display(self, obj):
        if not obj.rating:
            return "–"
        return format_html('<span title="{}">{}</span>', obj.rating_note, obj.get_rating_display())

    @admin.display(description="example")
    def example_link(self, obj):
        if obj.example_id is None:
            return "–"
        url = reverse("admin:finetuning_trainingexample_change", args=[obj.example_id])
        return format_html('<a href="{}">#{}</a>', url, obj.example_id)

    # --- the page -------------------------------------------------------------------------

    @admin.display(description="generation")
    def summary(self, obj):
        if obj.version_id is not None:
            version = format_html(
                '<a href="{}">{}</a>',
                reverse("admin:finetuning_modelversion_change", args=[obj.version_id]),
                obj.version_name,
            )
        else:
            version = obj.version_name or "–"
        if obj.api_key_id is not None:
            caller = format_html(
                'API key <a href="{}">{}</a>',
                reverse("admin:inference_apikey_change", args=[obj.api_key_id]),
                obj.api_key,
            )
        else:
            caller = self.caller(obj)
        rows = [
            ("when", f"{obj.created_at:%Y-%m-%d %H:%M:%S %Z}"),
            ("route", obj.get_route_display()),
            ("version", version),
            ("caller", caller),
            ("finish reason", obj.finish_reason or "–"),
            ("tokens", f"{obj.prompt_tokens} in the prompt, {obj.completion_tokens} generated"),
        ]
        if obj.error:
            rows.append(("error", format_html('<span class="generation-error">{}</span>', obj.error)))
        return _table(rows)

    @admin.display(description="as sent")
    def input_display(self, obj):
        asked = obj.input or {}
        product = input_product(asked)
        if product is not None:
            return _table([(key, _value(value)) for key, value in product.items()])
        if "messages" in asked:
            return _table([(m.get("role", "?"), _pre(str(m.get("content", "")))) for m in asked["messages"] or []])
        if "prompt" in asked:
            return _pre(str(asked["prompt"]))
        return _pre(json.dumps(asked, indent=2, ensure_ascii=False))

    @admin.display(description="prompt the model saw")
    def prompt_display(self, obj):
        return _pre(obj.prompt)

    @admin.display(description="output")
    def output_display(self, obj):
        return _pre(obj.output)

    @admin.display(description="parameters")
    def parameters_display(self, obj):
        return _table([(key, _value(value)) for key, value in (obj.parameters or {}).items()])

    @admin.display(description="timings (ms)")
    def timings_display(self, obj):
        return _table([(key, _value(value)) for key, value in (obj.timings or {}).items()])

    @admin.display(description="rated")
    def rated_display(self, obj):
        if not obj.rating:
            return "not rated"
        who = f" by {obj.rated_by.get_username()}" if obj.rated_by_id else ""
        when = f", {obj.rated_at:%Y-%m-%d %H:%M}" if obj.rated_at else ""
        return f"{obj.get_rating_display()}{who}{when}"

    @admin.display(description="example")
    def example_display(self, obj):
        if obj.example_id is not None:
            example = obj.example
            return format_html(
                'Training example <a href="{}">#{} {}</a> in dataset {} ({})',
                reverse("admin:finetuning_trainingexample_change", args=[example.pk]),
                example.pk,
                example.name,
                example.dataset.name,
                example.get_review_display().lower(),
            )
        try:
            generation_product(obj)
        except FeedbackError as exc:
            return format_html('<span class="generation-error">Cannot become an example: {}.</span>', exc.message)
        return "None yet: choose a dataset below and press “Add to dataset as training example”."

    # --- saving: through the feedback services --------------------------------------------

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        if "rating" in form.changed_data or "rating_note" in form.changed_data:
            generation_rate(generation=obj, rating=data["rating"], note=data["rating_note"], user=request.user)
        text = data["corrected_output"]
        # The text starts as the output: unchanged, it is no correction.
        generation_correct(generation=obj, text="" if text.strip() == obj.output.strip() else text)

    def save_related(self, request, form, formsets, change):
        pass  # no related rows: the services wrote everything

    def response_change(self, request, obj):
        if ADD_EXAMPLE not in request.POST:
            self.message_user(request, f"Feedback on generation {obj.pk} saved.", messages.SUCCESS)
            return HttpResponseRedirect(request.path)
        dataset = Dataset.objects.filter(pk=request.POST.get("dataset")).first()
        try:
            example = generation_example_add(generation=obj, dataset=dataset)
        except FeedbackError as exc:
            where = f" to {dataset.name}" if dataset else ""
            self.message_user(request, f"Not added{where}: {exc.field}: {exc.message}", messages.ERROR)
            return HttpResponseRedirect(request.path)
        url = reverse("admin:finetuning_trainingexample_change", args=[example.pk])
        self.message_user(
            request,
            format_html(
                'Added to {} as training example <a href="{}">#{}</a> (a draft: approve it to train on it).',
                example.dataset.name,
                url,
                example.pk,
            ),
            messages.SUCCESS,
        )
        return HttpResponseRedirect(request.path)
