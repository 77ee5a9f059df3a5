import math

from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce

from inference.models import ApiKeyUsage, Generation


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


def generations_summary(*, since):
    """What the generation log says about generations from ``since`` on: ``count``,
    ``errors`` (ended without an answer), ``median_ms`` and ``p95_ms`` (request to last
    token, answered ones), ``prompt_tokens`` and ``completion_tokens``. Percentiles by
    nearest rank in Python: SQLite (make run) has no percentile function."""
    rows = Generation.objects.filter(created_at__gte=since)
    totals = rows.aggregate(
        count=Count("id"),
        errors=Count("id", filter=~Q(error="")),
        prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
        completion_tokens=Coalesce(Sum("completion_tokens"), 0),
    )
    latencies = sorted(rows.filter(error="", total_ms__isnull=False).values_list("total_ms", flat=True))

    def percentile(share):
        if not latencies:
            return None
        return latencies[max(math.ceil(share * len(latencies)) - 1, 0)]

    return {**totals, "median_ms": percentile(0.5), "p95_ms": percentile(0.95)}
