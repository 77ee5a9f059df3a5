"""Start-up checks for the clients' settings: say at start what would otherwise
show only as a limit that does not hold or a proxy that is not trusted."""

import ipaddress

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


@register()
def clients_settings_check(app_configs, **kwargs):
    problems = []
    for proxy in settings.TRUSTED_PROXIES:
        try:
            ipaddress.ip_network(proxy.strip(), strict=False)
        except ValueError:
            problems.append(Error(f"TRUSTED_PROXIES: {proxy!r} is not an address or network", id="inference.E001"))
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
