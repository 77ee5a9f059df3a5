"""Start-up checks: a promotion gate configured with a metric that does not exist
would refuse every version in silence; say so when the process starts instead."""

from django.core.checks import Error, register


@register()
def promotion_settings_check(app_configs, **kwargs):
    from finetuning.metrics import promotion_settings_problems

    return [Error(problem, id="finetuning.E001") for problem in promotion_settings_problems()]
