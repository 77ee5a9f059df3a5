"""Display helpers every admin screen shares: readable JSON, loss charts, durations, progress."""

from django.contrib import admin
from django.shortcuts import redirect
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.timezone import localtime

from finetuning.charts import loss_chart
from finetuning.forms import json_pretty
from finetuning.services.workers import duration_words, queue_words, time_left_words


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
    return "–" if seconds is None else duration_words(seconds)


def next_or(request, fallback, *args):
    """Where a POST from another page (the dashboard) asked to go back to, if it is ours; else ``fallback``."""
    target = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return redirect(target)
    return redirect(fallback, *args)


class ProgressMixin:
    """Progress, step, time left and queue position of a long-running row (a job, an
    evaluation), in words from services/workers.py, and the narrow list columns that keep
    their lists within a 1366 px screen."""

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
        return time_left_words(obj)

    @admin.display(description="time left / place in line")
    def eta_list(self, obj):
        if obj.status == "queued":
            return queue_words(obj, named=1, wait=False)
        return time_left_words(obj)

    @admin.display(description="progress")
    def progress_list(self, obj):
        percent = round(obj.progress * 100)
        return format_html(
            '<progress value="{}" max="100" style="width:5em"></progress> {}%<br><small>{}</small>',
            percent,
            percent,
            f"step {obj.step} / {obj.total_steps}" if obj.total_steps else "",
        )

    @admin.display(description="finished", ordering="finished_at")
    def finished_list(self, obj):
        return localtime(obj.finished_at).strftime("%Y-%m-%d %H:%M") if obj.finished_at else "–"

    @admin.display(description="queue")
    def queue_display(self, obj):
        return queue_words(obj) or "–"
