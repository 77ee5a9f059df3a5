"""Admin forms: curators edit attributes as fields, not as raw JSON."""

import json
from dataclasses import fields as dataclass_fields

from django import forms
from django.utils.html import format_html, format_html_join

from finetuning.attributes import KNOWN_KEYS, LIST_KEYS
from finetuning.hyperparameters import METHODS, PRESETS, Hyperparameters
from finetuning.models import TrainingExample
from finetuning.services.examples import ExampleError, example_clean, example_duplicate_get

ATTRIBUTE_FIELDS = ("name", "category", "color", "brand", "audience", "price", "currency", "features", "keywords")


class LinesField(forms.CharField):
    """One value per line. Browsers send a textarea's lines joined by CRLF: they are read
    back joined by LF, as the form shows them, so that an untouched list is unchanged."""

    widget = forms.Textarea

    def to_python(self, value):
        value = super().to_python(value)
        return "\n".join(value.splitlines()) if value else value


def _as_text(value):
    """An attribute as its form field holds it: the text a curator sees and sends back
    (a price of 45.0 as "45.0", a list one item per line), so that an untouched field
    compares equal to what comes back and the history names only real changes."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(str(item) for item in value)
    return str(value)


class TrainingExampleForm(forms.ModelForm):
    name = forms.CharField(max_length=500)
    category = forms.CharField(max_length=500, required=False)
    color = forms.CharField(max_length=500, required=False)
    brand = forms.CharField(max_length=500, required=False)
    audience = forms.CharField(max_length=500, required=False, help_text="Who it is for: Women, Kids, Home cooks, …")
    price = forms.CharField(max_length=50, required=False)
    currency = forms.CharField(max_length=10, required=False)
    features = LinesField(widget=forms.Textarea(attrs={"rows": 4}), required=False, help_text="One per line.")
    keywords = LinesField(widget=forms.Textarea(attrs={"rows": 2}), required=False, help_text="One per line.")
    other_attributes = forms.JSONField(
        required=False,
        initial=dict,
        help_text='Any other attributes as a JSON object, e.g. {"material": "oak", "size": "L"}.',
    )

    class Meta:
        model = TrainingExample
        fields = ("dataset", "description", "split", "source")
        widgets = {"description": forms.Textarea(attrs={"rows": 6, "cols": 90})}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attributes = dict(self.instance.attributes or {})
        for key in ATTRIBUTE_FIELDS:
            self.initial[key] = _as_text(attributes.pop(key, None))
        self.initial["other_attributes"] = attributes

    def attributes(self):
        data = self.cleaned_data
        attributes = dict(data.get("other_attributes") or {})
        for key in ATTRIBUTE_FIELDS:
            value = data.get(key)
            if value not in (None, ""):
                attributes[key] = value.splitlines() if key in LIST_KEYS else value
        return attributes

    def clean_other_attributes(self):
        value = self.cleaned_data.get("other_attributes") or {}
        if not isinstance(value, dict):
            raise forms.ValidationError("must be a JSON object")
        clash = sorted(set(value) & set(KNOWN_KEYS))
        if clash:
            raise forms.ValidationError(f"use the fields above for {', '.join(clash)}")
        return value

    def clean(self):
        data = super().clean()
        if self.errors or not data.get("dataset"):
            return data
        try:
            fields = example_clean(attributes=self.attributes(), description=data["description"], split=data["split"])
        except ExampleError as exc:
            target = exc.field.removeprefix("attributes.")
            self.add_error(target if target in self.fields else "other_attributes", exc.message)
            return data
        duplicate = example_duplicate_get(
            dataset=data["dataset"], content_hash_=fields["content_hash"], exclude_pk=self.instance.pk
        )
        if duplicate:
            raise forms.ValidationError(f"The same example is already in {data['dataset']} (example {duplicate.pk}).")
        return data


HYPERPARAMETER_NAMES = tuple(f.name for f in dataclass_fields(Hyperparameters))


def _preset_values(hp):
    """Hyperparameters as the fine-tune form's fields hold them."""
    values = hp.as_dict()
    values["lora_target_modules"] = ",".join(values["lora_target_modules"])
    return values


class FineTuneForm(forms.Form):
    """Every hyperparameter, with its default; bounds are checked by
    hyperparameters_parse, the same check the API and the command use.
    A preset only fills the fields: what is submitted is what trains."""

    fieldsets = (
        ("Preset", {"fields": ("preset",)}),
        (
            "Training",
            {
                "fields": (
                    "method",
                    ("epochs", "max_steps"),
                    ("batch_size", "gradient_accumulation_steps"),
                    ("learning_rate", "warmup_ratio"),
                    "weight_decay",
                    "eval_steps",
                    "seed",
                )
            },
        ),
        (
            "LoRA",
            {
                "fields": (("lora_r", "lora_alpha"), "lora_dropout", "lora_target_modules"),
                "description": "Used when the method is lora.",
            },
        ),
        ("Data", {"fields": ("max_seq_length", "name_product", "facts_from_description", "invented_facts")}),
    )

    _defaults = Hyperparameters()
    preset = forms.ChoiceField(
        choices=[("", "— custom —"), *((p.name, p.label) for p in PRESETS.values())],
        required=False,
        initial="default",
        help_text=format_html(
            "{}<div>Choosing one fills the fields below; every value stays editable.</div>",
            format_html_join(
                "", "<div><strong>{}</strong>: {}</div>", ((p.label, p.description) for p in PRESETS.values())
            ),
        ),
    )
    method = forms.ChoiceField(
        choices=[(m, m) for m in METHODS],
        initial=_defaults.method,
        help_text="lora: small adapters on the frozen base (fast, a few MB). full: every weight (slower, 540 MB).",
    )
    epochs = forms.IntegerField(initial=_defaults.epochs)
    max_steps = forms.IntegerField(initial=_defaults.max_steps, help_text="0: run all epochs.")
    learning_rate = forms.FloatField(initial=_defaults.learning_rate, help_text="Try 1e-5 to 5e-5 for full.")
    batch_size = forms.IntegerField(initial=_defaults.batch_size)
    gradient_accumulation_steps = forms.IntegerField(
        initial=_defaults.gradient_accumulation_steps,
        label="Accumulation steps",
        help_text="Batches per optimiser step.",
    )
    warmup_ratio = forms.FloatField(initial=_defaults.warmup_ratio, help_text="Share of steps with a rising rate.")
    weight_decay = forms.FloatField(initial=_defaults.weight_decay)
    max_seq_length = forms.IntegerField(
        initial=_defaults.max_seq_length,
        help_text="Prompt and description tokens. A description that does not fit is cut short; "
        "an example whose prompt alone fills it is skipped. The pre-flight below counts both.",
    )
    seed = forms.IntegerField(initial=_defaults.seed, help_text="Same data, settings and seed: same model.")
    eval_steps = forms.IntegerField(
        initial=_defaults.eval_steps, help_text="Validation loss every this many steps; 0: after each epoch."
    )
    lora_r = forms.IntegerField(initial=_defaults.lora_r, label="LoRA r")
    lora_alpha = forms.IntegerField(initial=_defaults.lora_alpha, label="LoRA alpha")
    lora_dropout = forms.FloatField(initial=_defaults.lora_dropout, label="LoRA dropout")
    lora_target_modules = forms.CharField(
        initial=",".join(_defaults.lora_target_modules),
        label="LoRA target modules",
        help_text="Comma-separated module names.",
        widget=forms.TextInput(attrs={"size": 60}),
    )
    name_product = forms.BooleanField(
        required=False,
        initial=_defaults.name_product,
        label="Name the product",
        help_text="Train on descriptions that name the product: those that do not are opened with its name. "
        "Off: learn the descriptions exactly as written.",
    )
    facts_from_description = forms.BooleanField(
        required=False,
        initial=_defaults.facts_from_description,
        label="Facts from the descriptions",
        help_text="Add the fact terms (materials, technologies, sports, fits) that each training description "
        "states and its attributes do not to the example's features, so that the model learns to take facts "
        "from the prompt instead of inventing them.",
    )
    invented_facts = forms.ChoiceField(
        choices=[
            ("learn", "learn: like every other word"),
            ("skip", "skip: no loss on them"),
            ("avoid", "avoid: trained to be unlikely"),
        ],
        initial=_defaults.invented_facts,
        label="Invented facts",
        help_text="What training does with a fact (material, technology, sport, fit) that a description states "
        "and its attributes do not. learn: the copy as written, facts and all. skip: the model learns the sentence "
        "around the fact but not the fact. avoid: the fact is trained to be unlikely where the copy states it.",
    )
    # The number of examples the curator agreed to train on when too many would be skipped:
    # a confirmation holds only for the numbers it was given.
    confirm_examples = forms.IntegerField(required=False, initial="", widget=forms.HiddenInput)

    def __init__(self, *args, preset=None, **kwargs):
        """``preset``: start an unbound form from that preset's values."""
        super().__init__(*args, **kwargs)
        if preset in PRESETS:
            self.initial = {**self.initial, **_preset_values(PRESETS[preset].hyperparameters), "preset": preset}

    @staticmethod
    def preset_values():
        """Each preset's field values, for the page's script that fills the form."""
        return {name: _preset_values(preset.hyperparameters) for name, preset in PRESETS.items()}

    def hyperparameters(self):
        """The submitted hyperparameters (after is_valid), or the initial ones of an unbound form."""
        if not self.is_bound:
            return {name: self.initial.get(name, self.fields[name].initial) for name in HYPERPARAMETER_NAMES}
        return {name: self.cleaned_data.get(name) for name in HYPERPARAMETER_NAMES}


def json_pretty(value):
    return json.dumps(value, indent=2, sort_keys=True)
