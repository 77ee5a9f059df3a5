"""Errors as clients see them: always JSON under /api/ and /v1/.

The native API answers ``{"detail": "..."}`` (a 400 names each bad field
instead); the OpenAI-compatible routes answer OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, which the official client
turns into its exception classes. Views raise; these handlers shape.
"""

import logging
import sys

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import HttpResponse, JsonResponse
from django.template import loader
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.views import exception_handler as drf_exception_handler

from inference.parsers import RequestTooLarge

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"
DATABASE_UNAVAILABLE = "the database is unavailable; try again in a few seconds"
API_PREFIXES = ("/api/", OPENAI_PREFIX)


class RateLimited(exceptions.APIException):
    """Over a limit of the key (or of sign-ins from an address): 429 with Retry-After."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS

    def __init__(self, exceeded):
        super().__init__(exceeded.message, code=exceeded.limit)
        self.limit = exceeded.limit
        self.wait = exceeded.retry_after  # DRF's handler turns it into Retry-After


class ServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "service_unavailable"

    def __init__(self, detail, *, retry_after=None):
        super().__init__(detail)
        self.wait = retry_after


class GatewayTimeout(exceptions.APIException):
    status_code = status.HTTP_504_GATEWAY_TIMEOUT
    default_code = "timeout"


def _database_unavailable(exc):
    """A database error as the 503 a client sees; the driver's text (host, port) only in the log."""
    logger.error("The database is unavailable: %s", exc, exc_info=exc)
    return ServiceUnavailable(DATABASE_UNAVAILABLE, retry_after=settings.DATABASE_RETRY_AFTER_SECONDS)


def _translated(exc):
    """Django's exceptions that are the client's or the database's doing, as API errors (DRF
    passes them on to Django, which would answer 400 "bad request" or 500)."""
    if isinstance(exc, DatabaseError):
        return _database_unavailable(exc)
    if isinstance(exc, RequestDataTooBig):
        return _too_large()
    return exc


def _too_large():
    return RequestTooLarge(f"the request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes")


def exception_handler(exc, context):
    """The native API's errors: DRF's, plus the limit a 429 hit and a database outage's 503."""
    exc = _translated(exc)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, RateLimited):
        response.data = {"detail": str(exc.detail), "limit": exc.limit, "retry_after": exc.wait}
    return response


# --- OpenAI's shape ---------------------------------------------------------------


def openai_error(message, *, type="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _field_errors(detail, path=""):
    """(param path, message, code) of every error in a DRF validation detail, in order."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            key = str(key)
            if key == "non_field_errors":
                yield from _field_errors(value, path)
            else:
                yield from _field_errors(value, f"{path}[{key}]" if key.isdigit() else f"{path}.{key}".lstrip("."))
    elif isinstance(detail, list):
        for index, value in enumerate(detail):
            if isinstance(value, dict | list):
                yield from _field_errors(value, f"{path}[{index}]")
            else:
                yield path or None, str(value), getattr(value, "code", None)
    else:
        yield path or None, str(detail), getattr(detail, "code", None)


_RATE_TYPES = {"requests_per_minute": "requests", "tokens_per_minute": "tokens"}


def _openai_body(exc, status_code):
    if isinstance(exc, exceptions.ValidationError):
        errors = list(_field_errors(exc.detail))
        param, _, code = errors[0]
        message = "; ".join(f"{path}: {text}" if path else text for path, text, _ in errors)
        return openai_error(message, param=param, code=code)
    message = str(getattr(exc, "detail", exc))
    param = getattr(exc, "param", None)
    if isinstance(exc, RateLimited):
        if exc.limit == "daily_token_quota":
            return openai_error(message, type="insufficient_quota", code="insufficient_quota")
        return openai_error(message, type=_RATE_TYPES.get(exc.limit, "requests"), code="rate_limit_exceeded")
    if isinstance(exc, exceptions.AuthenticationFailed):
        return openai_error(message, code="invalid_api_key")
    if isinstance(exc, exceptions.NotAuthenticated):
        return openai_error(message, code="missing_api_key")
    if isinstance(exc, exceptions.PermissionDenied):
        return openai_error(message, type="permission_error", param=param, code=_code(exc))
    if status_code >= 500:
        return openai_error(message, type="server_error", code=_code(exc))
    return openai_error(message, param=param, code=_code(exc))


def _code(exc):
    codes = exc.get_codes() if isinstance(exc, exceptions.APIException) else None
    return codes if isinstance(codes, str) else None


def openai_exception_handler(exc, context):
    exc = _translated(exc)
    response = drf_exception_handler(exc, context)
    if response is not None:
        response.data = _openai_body(exc, response.status_code)
    return response


# --- Django's own error views, for paths no API view answered --------------------


def _api_error(request, status_code, message, openai_type="invalid_request_error", code=None):
    if request.path.startswith(OPENAI_PREFIX):
        body = openai_error(message, type=openai_type, code=code)
    else:
        body = {"detail": message}
    return JsonResponse(body, status=status_code)


@csrf_exempt  # a POST to a path that does not exist is a 404, not a CSRF failure
def not_found(request, exception=None):
    if request.path.startswith(API_PREFIXES):
        return _api_error(request, 404, f"no such endpoint: {request.path}", code="not_found")
    return defaults.page_not_found(request, exception)


def bad_request(request, exception=None):
    if isinstance(exception, RequestDataTooBig) and request.path.startswith(API_PREFIXES):
        return _api_error(request, 413, str(_too_large().detail), code="request_too_large")
    if request.path.startswith(API_PREFIXES):
        return _api_error(request, 400, "bad request", code="bad_request")
    return defaults.bad_request(request, exception)


def database_unavailable_response(request, exc):
    """503 for a database error outside DRF's views (the admin, a middleware's query)."""
    logger.error("The database is unavailable: %s", exc, exc_info=exc)
    if request.path.startswith(API_PREFIXES):
        response = _api_error(
            request, 503, DATABASE_UNAVAILABLE, openai_type="server_error", code="service_unavailable"
        )
    else:
        response = HttpResponse(loader.render_to_string("503.html"), status=503)
    response["Retry-After"] = str(settings.DATABASE_RETRY_AFTER_SECONDS)
    return response


def server_error(request):
    # A database error raised in a middleware (a session saved as the response leaves) gets here.
    exc = sys.exc_info()[1]
    if isinstance(exc, DatabaseError):
        return database_unavailable_response(request, exc)
    if request.path.startswith(API_PREFIXES):
        return _api_error(request, 500, "internal server error", openai_type="server_error", code="server_error")
    return defaults.server_error(request)
