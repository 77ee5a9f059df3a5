"""Start-up checks: say at start what would otherwise show only as a limit that does not
hold, a proxy that is not trusted, a default past its cap or kernels that were never built."""

import ipaddress

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from inference import native


@register()
def clients_settings_check(app_configs, **kwargs):
    problems = []
    for proxy in settings.TRUSTED_PROXIES:
        try:
            ipaddress.ip_network(proxy.strip(), strict=False)
        except ValueError:
            problems.append(Error(f"TRUSTED_PROXIES: {proxy!r} is not an address or network", id="inference.E001"))
    if settings.GENERATE_DEFAULT_MAX_NEW_TOKENS > settings.GENERATE_MAX_NEW_TOKENS:
        problems.append(
            Error(
                f"GENERATE_DEFAULT_MAX_NEW_TOKENS ({settings.GENERATE_DEFAULT_MAX_NEW_TOKENS}) is larger than "
                f"GENERATE_MAX_NEW_TOKENS ({settings.GENERATE_MAX_NEW_TOKENS}): a request that gives no "
                "max_new_tokens would generate past the cap",
                hint="Lower GENERATE_DEFAULT_MAX_NEW_TOKENS, or leave it unset (it then follows the cap)",
                id="inference.E002",
            )
        )
    for name in ("GENERATE_NO_REPEAT_NGRAM_SIZE", "EVALUATION_NO_REPEAT_NGRAM_SIZE"):
        size = getattr(settings, name)
        if size < 0:
            problems.append(
                Error(
                    f"{name} ({size}) must be 0 (no repeated n-gram rule) or more",
                    id="inference.E003",
                )
            )
    for name, cap in (
        ("GENERATE_MIN_NEW_TOKENS", settings.GENERATE_DEFAULT_MAX_NEW_TOKENS),
        ("EVALUATION_MIN_NEW_TOKENS", settings.EVALUATION_MAX_NEW_TOKENS),
    ):
        floor = getattr(settings, name)
        if not 0 <= floor <= cap:
            problems.append(
                Error(
                    f"{name} ({floor}) must be 0 (no length floor) up to the default length ({cap})",
                    id="inference.E004",
                )
            )
    if settings.GENERATE_ALLOW_ANONYMOUS and not settings.DEBUG:
        problems.append(
            Warning(
                "GENERATE_ALLOW_ANONYMOUS is on outside development: anyone can generate without an API key",
                id="inference.W001",
            )
        )
    return problems


@register(Tags.security, deploy=True)
def clients_cache_check(app_configs, **kwargs):
    if settings.CACHES["default"]["BACKEND"].endswith("LocMemCache"):
        return [
            Warning(
                "CACHE_URL is not set: API key limits and sign-in throttling count per process, so each web "
                "process allows the whole limit",
                hint="Set CACHE_URL=redis://HOST:6379/1",
                id="inference.W002",
            )
        ]
    return []


@register()
def native_kernels_check(app_configs, **kwargs):
    """Say at start what a model load would otherwise find out: the kernels are built at install
    time (serving never compiles them). A stamp check, no compiler, no torch import."""
    reason = native.problem(settings.INFERENCE_NATIVE_DIR)
    if reason is None:
        return []
    if settings.INFERENCE_QUANTIZE == "int8":
        return [Warning(f"INFERENCE_QUANTIZE=int8 will refuse to load models: {reason}", id="inference.W004")]
    return [
        Warning(
            f"decoding falls back to fp32 weights and torch's products (4-5x slower per stream, 5x the memory): "
            f"{reason}",
            id="inference.W003",
        )
    ]
