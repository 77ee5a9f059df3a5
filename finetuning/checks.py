"""Start-up checks: a promotion gate configured with a metric that does not exist
would refuse every version in silence; say so when the process starts instead."""

from django.conf import settings
from django.core.checks import Error, register


@register()
def promotion_settings_check(app_configs, **kwargs):
    from finetuning.metrics import METRICS

    choices = ", ".join(key for key, metric in METRICS.items() if metric.better)
    errors = []
    for name, keys in (
        ("PROMOTION_PRIMARY_METRIC", [settings.PROMOTION_PRIMARY_METRIC]),
        ("PROMOTION_GUARD_METRICS", list(settings.PROMOTION_GUARD_METRICS)),
    ):
        for key in keys:
            if key not in METRICS or not METRICS[key].better:
                errors.append(
                    Error(
                        f"{name}: {key!r} is not a metric with a better direction",
                        hint=f"choose from {choices}",
                        id="finetuning.E001",
                    )
                )
    return errors
