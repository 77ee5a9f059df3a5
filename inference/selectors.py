from django.db.models import Sum

from inference.models import ApiKeyUsage


def usage_completion_tokens(*, key_id, day):
    """Tokens ``key_id`` generated on ``day`` (UTC), as recorded."""
    row = ApiKeyUsage.objects.filter(key_id=key_id, day=day).values_list("completion_tokens", flat=True).first()
    return row or 0


def usage_days(*, key, since):
    """``key``'s usage rows from ``since`` on, newest first."""
    return ApiKeyUsage.objects.filter(key=key, day__gte=since).order_by("-day")


def usage_totals(*, key, since):
    return ApiKeyUsage.objects.filter(key=key, day__gte=since).aggregate(
        requests=Sum("requests"),
        errors=Sum("errors"),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
    )
