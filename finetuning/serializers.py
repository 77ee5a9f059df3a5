from rest_framework import serializers

from finetuning.models import FineTuningJob


class JobStartSerializer(serializers.Serializer):
    dataset = serializers.CharField(
        required=False, max_length=100, help_text="Name of the dataset to train on (its current examples)."
    )
    retrain = serializers.CharField(
        required=False,
        max_length=100,
        help_text="Name of a model version to retrain exactly: its data snapshot, hyperparameters and base model.",
    )
    hyperparameters = serializers.DictField(
        required=False,
        default=dict,
        help_text="Overrides of the defaults: method (lora|full), epochs, max_steps, learning_rate, batch_size, "
        "gradient_accumulation_steps, warmup_ratio, weight_decay, max_seq_length, seed, eval_steps, lora_r, "
        "lora_alpha, lora_dropout, lora_target_modules, name_product (true: train on descriptions that name "
        "the product).",
    )

    def validate(self, data):
        if bool(data.get("dataset")) == bool(data.get("retrain")):
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
