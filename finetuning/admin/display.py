"""Display helpers every admin screen shares: readable JSON, loss charts, durations, progress."""

from django.contrib import admin
from django.utils.html import format_html

from finetuning.charts import loss_chart
from finetuning.forms import json_pretty


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


def loss_chart_display(train_history, validation_history):
    return loss_chart(
        [("train loss", "#417690", train_history), ("validation loss (training)", "#d9534f", validation_history)]
    )


def duration_display(seconds):
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
        return f"about {duration_display(obj.eta_seconds)}" if obj.eta_seconds is not None else "estimating…"
