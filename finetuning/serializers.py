from rest_framework import serializers

from finetuning.hyperparameters import BOUNDS, INVENTED_FACTS, LORA_TARGETS, METHODS, Hyperparameters
from finetuning.models import FineTuningJob
from inference.fields import (
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    StrictSerializer,
)


def _bounded(name):
    kind, low, high = BOUNDS[name]
    field = StrictIntegerField if kind is int else StrictFloatField
    message = f"must be between {low} and {high}"
    return field(
        min_value=low,
        max_value=high,
        required=False,
        error_messages={"min_value": message, "max_value": message},
        help_text=f"Default {getattr(Hyperparameters, name)}.",
    )


class HyperparametersSerializer(StrictSerializer):
    """Overrides of the defaults, typed as JSON: the bounds are finetuning.hyperparameters', which
    the job checks again (the admin and the command pass text)."""

    method = serializers.ChoiceField(choices=METHODS, required=False, help_text="Default lora.")
    lora_target_modules = serializers.ListField(
        child=serializers.ChoiceField(choices=LORA_TARGETS),
        min_length=1,
        required=False,
        help_text="Default: all of them.",
    )
    name_product = StrictBooleanField(
        required=False, help_text="Default true: train on descriptions that name the product."
    )
    facts_from_description = StrictBooleanField(
        required=False,
        help_text="Default false: add the fact terms each training description states to its example's features.",
    )
    invented_facts = serializers.ChoiceField(
        choices=INVENTED_FACTS,
        required=False,
        help_text=f"Default {Hyperparameters.invented_facts}: what training does with a fact a description states "
        "and its attributes do not (learn it, skip it: no loss, avoid it: trained to be unlikely).",
    )

    def get_fields(self):
        return {**super().get_fields(), **{name: _bounded(name) for name in BOUNDS}}


class JobStartSerializer(StrictSerializer):
    schema_extra = {
        "oneOf": [
            {"required": ["dataset"], "not": {"required": ["retrain"]}},
            {
                "required": ["retrain"],
                "not": {
                    "anyOf": [
                        {"required": ["dataset"]},
                        {"required": ["hyperparameters"], "properties": {"hyperparameters": {"minProperties": 1}}},
                    ]
                },
            },
        ]
    }

    dataset = StrictCharField(
        required=False, max_length=100, help_text="Name of the dataset to train on (its current examples)."
    )
    retrain = StrictCharField(
        required=False,
        max_length=100,
        help_text="Name of a model version to retrain exactly: its data snapshot, hyperparameters and base model.",
    )
    hyperparameters = HyperparametersSerializer(required=False, help_text="With dataset: overrides of the defaults.")

    def validate(self, data):
        if ("dataset" in data) == ("retrain" in data):
            raise serializers.ValidationError({"dataset": ["give either dataset or retrain, not both or neither"]})
        if data.get("retrain") and data.get("hyperparameters"):
            raise serializers.ValidationError({"hyperparameters": ["a retrain uses the version's own hyperparameters"]})
        return data


class SnapshotSerializer(serializers.Serializer):
    path = serializers.CharField()
    sha256 = serializers.CharField()
    examples = serializers.IntegerField()
    train_examples = serializers.IntegerField()
    validation_examples = serializers.IntegerField()
    note = serializers.CharField()


class VersionRefSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="pk")
    name = serializers.CharField()


class JobSerializer(serializers.ModelSerializer):
    dataset = serializers.CharField(source="dataset.name")
    snapshot = SnapshotSerializer(allow_null=True)
    model_version = serializers.SerializerMethodField()
    cancel_requested = serializers.SerializerMethodField()
    wall_seconds = serializers.FloatField(allow_null=True)
    requested_by = serializers.StringRelatedField()

    class Meta:
        model = FineTuningJob
        fields = [
            "id",
            "dataset",
            "status",
            "progress",
            "step",
            "total_steps",
            "eta_seconds",
            "loss_history",
            "validation_history",
            "metrics",
            "error",
            "hyperparameters",
            "base_model",
            "snapshot",
            "environment",
            "model_version",
            "cancel_requested",
            "worker",
            "heartbeat_at",
            "time_limit_seconds",
            "wall_seconds",
            "requested_by",
            "created_at",
            "started_at",
            "finished_at",
        ]

    @staticmethod
    def _version(job):
        try:
            return job.model_version
        except FineTuningJob.model_version.RelatedObjectDoesNotExist:
            return None

    def get_model_version(self, job) -> VersionRefSerializer(allow_null=True):
        version = self._version(job)
        return VersionRefSerializer(version).data if version else None

    def get_cancel_requested(self, job) -> bool:
        return job.cancel_requested_at is not None
