"""What every client-facing API view shares: key authentication, the scope
rule, the per-key limits and the usage record. Views subclass ClientAPIView
and name their scope; generation views also go through ``generation_start``
and ``generation_end``, which reserve and settle tokens."""

import functools
import select
import socket
import threading
from contextlib import contextmanager

from rest_framework import exceptions
from rest_framework.exceptions import APIException
from rest_framework.views import APIView

from finetuning.selectors import version_get
from inference import limits
from inference.auth import ApiKeyAuthentication, ScopePermission, api_key
from inference.engine import PromptTooLong, QueueFull
from inference.errors import GatewayTimeout, RateLimited, ServiceUnavailable
from inference.generation import GenerationTimeout, QueueTimeout
from inference.loader import ModelUnavailable
from inference.models import ApiKey
from inference.services.generation import active_version_current, generation_begin, run_result
from inference.services.generation_log import generation_log_enabled, generations_pending, run_records
from inference.services.usage import usage_record


class ClientAPIView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [ScopePermission]
    scope = None  # the key scope this view needs (None: any valid key)
    permission = None  # the Django permission a signed-in user (and a key's owner) needs

    def scope_for(self, request):
        return self.scope

    def permission_for(self, request):
        return self.permission

    def get_authenticate_header(self, request):
        # Name every way in (Bearer first), not only the first authentication class's.
        headers = [auth.authenticate_header(request) for auth in self.get_authenticators()]
        return ", ".join(header for header in headers if header) or None

    def check_permissions(self, request):
        try:
            super().check_permissions(request)
        except exceptions.APIException:
            # Authentication counted the request against the key's limit; a refused one does not count.
            key = api_key(request)
            if key is not None:
                limits.uncount(getattr(key, "request_window", None))
            raise

    def check_throttles(self, request):
        key = api_key(request)
        if key is None:
            return
        try:
            request.admission = limits.request_admit(key, getattr(key, "request_window", None))
        except limits.LimitExceeded as exc:
            raise RateLimited(exc) from exc

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        version = getattr(request, "model_version", None)
        if version is not None:  # every answer of a generation names its version, errors included
            response["X-Model-Version"] = version.name
            response["X-Model-Version-Id"] = str(version.pk)
        key = api_key(request) if hasattr(request, "_auth") else None
        if key is None:
            return response
        admission = getattr(request, "admission", None)
        if admission is not None:
            response["X-RateLimit-Limit-Requests"] = str(admission.limit)
            response["X-RateLimit-Remaining-Requests"] = str(admission.remaining)
        reservation = getattr(request, "reservation", None)
        if reservation is not None and reservation.limit is not None:
            response["X-RateLimit-Limit-Tokens"] = str(reservation.limit)
            response["X-RateLimit-Remaining-Tokens"] = str(reservation.remaining)
        if not response.streaming:  # a stream records its usage when it ends
            usage_record(
                key_id=key.pk,
                requests=1,
                errors=int(response.status_code >= 400),
                **getattr(request, "token_usage", {}),
            )
        return response

    # --- Model versions ---------------------------------------------------------

    def version_resolve(self, request, reference, *, field):
        """The version ``reference`` names (the active one for None), if this caller may
        use it: unreleased versions (neither active nor approved) need the
        models:unreleased scope. Raises NotFound or PermissionDenied naming the rule."""
        if reference is None:
            version = active_version_current()
            if version is None:
                raise ServiceUnavailable("no model version is active; run `python manage.py prepare_base_model`")
            return version
        version = reference if not isinstance(reference, str) else version_get(reference=reference)
        if version is None:
            error = exceptions.NotFound(f"{field}: no model version named {reference!r}", code="model_not_found")
        elif not version.is_released and not self.may_use_unreleased(request):
            error = exceptions.PermissionDenied(
                f"{field}: model version {version.name!r} is not released (neither active nor approved for "
                "clients); only API keys with the 'models:unreleased' scope may use it",
                code="model_not_released",
            )
        else:
            return version
        error.param = field  # named in OpenAI's error shape
        raise error

    @staticmethod
    def may_use_unreleased(request):
        key = api_key(request)
        return key is not None and ApiKey.Scope.MODELS_UNRELEASED in key.scopes

    # --- Generation ---------------------------------------------------------------

    def generation_start(self, request, requests, *, max_tokens, field):
        """Start every generation of ``requests`` ([{params, version, product | prompt | messages}])
        after reserving ``max_tokens`` for the key. Raises the API's errors (400 naming
        ``field`` for a prompt over the context, 429, 503) with nothing left running."""
        key = api_key(request)
        if key is not None:
            try:
                request.reservation = limits.tokens_reserve(key, max_tokens)
            except limits.LimitExceeded as exc:
                raise RateLimited(exc) from exc
        runs = []
        try:
            for spec in requests:
                runs.append(generation_begin(**spec))
                request.model_version = runs[-1].version
        except BaseException as exc:
            for run in runs:
                run.generation.cancel()
            self.generation_end(request, runs)
            if isinstance(exc, PromptTooLong):
                detail = exceptions.ErrorDetail(str(exc), code="context_length_exceeded")
                raise exceptions.ValidationError({field: [detail]}) from exc
            if isinstance(exc, ModelUnavailable):
                raise ServiceUnavailable(str(exc)) from exc
            if isinstance(exc, QueueFull):
                raise ServiceUnavailable(str(exc), retry_after=exc.retry_after) from exc
            raise
        return runs

    def generation_end(self, request, runs):
        """Charge what ``runs`` generated (every token made, to the end or the client's
        leaving) against the reservation, and for a stream record the request's usage."""
        completion = sum(run.generation.completion_tokens() for run in runs)
        prompt = sum(run.prompt_tokens for run in runs)
        reservation = getattr(request, "reservation", None)
        if reservation is not None:
            reservation.settle(completion)
        request.token_usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        return request.token_usage

    def stream_end(self, request, runs, *, error):
        """A stream has ended (done, failed or left): settle and record its usage."""
        usage = self.generation_end(request, runs)
        key = api_key(request)
        if key is not None:
            usage_record(key_id=key.pk, requests=1, errors=int(error), **usage)

    def results(self, request, runs):
        """Wait for every run: their response dicts. Raises GatewayTimeout (504). A client
        that hangs up meanwhile cancels them, as a stream's does: its place in the batch
        goes to the next request."""
        try:
            with _cancel_on_hang_up(request, runs):
                return [run_result(run) for run in runs]
        except GenerationTimeout as exc:
            for run in runs:
                run.generation.cancel()
            if isinstance(exc, QueueTimeout):
                raise ServiceUnavailable(str(exc), retry_after=exc.retry_after) from exc
            raise GatewayTimeout(str(exc)) from exc
        finally:
            self.generation_end(request, runs)


# How often a non-streaming request's connection is checked while its generation runs.
HANG_UP_POLL_SECONDS = 0.2


def client_gone(request):
    """Whether the client closed the connection of ``request`` (under gunicorn; False where
    the server does not give the socket). A request's body has been read by now, so the
    socket is readable only at its end (b"") or when the client pipelines another request."""
    sock = request.META.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset, or closed under us
        return True


@contextmanager
def _cancel_on_hang_up(request, runs):
    if request.META.get("gunicorn.socket") is None:
        yield
        return
    done = threading.Event()

    def watch():
        while not done.wait(HANG_UP_POLL_SECONDS):
            if client_gone(request):
                for run in runs:
                    run.generation.cancel()
                return

    watcher = threading.Thread(target=watch, name="genapi-hang-up", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


CLIENT_LEFT = "the client closed the connection before the answer was complete"


class GenerationLogMixin:
    """Records a generation view's runs in the generation log (services.generation_log) once
    the client has its answer: a plain response when the server closes it, after the body was
    sent; a stream when it ends. A write that fails, or waits for a database that is down,
    then costs the client nothing."""

    log_route = None  # a Generation.Route

    def generation_log(self, request, runs, inputs, *, results=None, error=""):
        """The log's records of ``runs`` (for ``inputs``, what each was asked), their answers
        ``results`` when they finished, else the text made until ``error``."""
        if not generation_log_enabled():
            return []
        key = api_key(request)
        user = None if key is not None else request.user
        records = []
        for i, run in enumerate(runs):
            result = results[i] if results is not None and i < len(results) else None
            run_error = error if result is None else ""
            if result is not None and any(c["finish_reason"] == "cancelled" for c in result["choices"]):
                run_error = CLIENT_LEFT
            records += run_records(
                route=self.log_route,
                run=run,
                input=inputs[i],
                result=result,
                error=run_error,
                unfinished_reason="cancelled" if run_error == CLIENT_LEFT else "timeout",
                api_key=key,
                user=user,
            )
        return records

    def generation_log_results(self, request, runs, inputs):
        """Wait for ``runs`` (ClientAPIView.results) and log them, the answers or the error,
        when the response has been sent."""
        try:
            results = self.results(request, runs)
        except APIException as exc:
            request.generation_records = self.generation_log(request, runs, inputs, error=str(exc.detail))
            raise
        request.generation_records = self.generation_log(request, runs, inputs, results=results)
        return results

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        records = getattr(request, "generation_records", None)
        if records:
            # Run by response.close(), which the server calls once the body is sent.
            response._resource_closers.append(functools.partial(generations_pending(), records))
        return response
