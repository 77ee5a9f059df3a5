"""The native API, HTTP only: validate with a serializer, call the services, return JSON."""

import datetime
import hmac
import json
import logging

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, StreamingHttpResponse
from django.views.decorators.http import require_safe
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from finetuning.selectors import active_version_get, version_list
from genapi.health import deployment_checks
from inference import limits, telemetry
from inference.auth import api_key
from inference.clients import CLIENT_LEFT, ClientAPIView, GenerationLogMixin
from inference.loader import model_loaded
from inference.models import ApiKey, Generation
from inference.schema import ErrorSerializer, error_responses, retry_after_headers, sse_schema
from inference.selectors import usage_days
from inference.serializers import (
    GenerateRequestSerializer,
    GenerateResponseSerializer,
    ModelListSerializer,
    ReadySerializer,
    UsageQuerySerializer,
    UsageResponseSerializer,
)
from inference.services.generation import active_version_warm_start, run_stream, warm_failure
from inference.services.generation_log import generations_pending

logger = logging.getLogger(__name__)

_STREAM_DESCRIPTION = (
    "With `stream: true`: server-sent events, each `event: NAME` and `data: JSON` then a blank line (the schema "
    "and examples describe one event: its name and its data). "
    '`chunk`: `{"index": 0, "text": "..."}` (StreamChunk) for each piece of text as soon as it is final; the '
    "pieces of an index add up to its whole text. Then `done`: the same body as the JSON answer (GenerateResponse: "
    'whole text, finish reasons, usage, model version, timings), or `error`: `{"detail": "...", "status": 504}` '
    "(StreamError) when the time limit passes. Disconnecting stops the generation."
)


_CHUNK_SCHEMA = {
    "type": "object",
    "properties": {"index": {"type": "integer"}, "text": {"type": "string"}},
    "required": ["index", "text"],
}
_STREAM_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}, "status": {"type": "integer", "description": "504: the time limit."}},
    "required": ["detail", "status"],
}


def _event(name, data):
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class GenerateView(GenerationLogMixin, ClientAPIView):
    scope = ApiKey.Scope.GENERATE
    log_route = Generation.Route.API

    @extend_schema(
        operation_id="generate",
        summary="Write a product description",
        request=GenerateRequestSerializer,
        parameters=retry_after_headers(429, 503),
        responses={
            (200, "application/json"): OpenApiResponse(
                GenerateResponseSerializer,
                description="The answer; the version that wrote it is also in the X-Model-Version header.",
            ),
            (200, "text/event-stream"): OpenApiResponse(
                sse_schema(
                    {
                        "chunk": _CHUNK_SCHEMA,
                        "done": {"$ref": "#/components/schemas/GenerateResponse"},
                        "error": _STREAM_ERROR_SCHEMA,
                    }
                ),
                description=_STREAM_DESCRIPTION,
            ),
            **error_responses(400, 401, 403, 404, 413, 415, 429, 503, 504),
        },
        examples=[
            OpenApiExample(
                "From product attributes",
                request_only=True,
                value={
                    "product": {
                        "name": "Trail Running Shoe",
                        "category": "Shoes",
                        "color": "Grey",
                        "brand": "Northwick",
                        "price": 89.99,
                        "currency": "USD",
                        "features": ["grippy outsole", "breathable mesh upper"],
                        "material": "recycled mesh",
                    },
                    "max_new_tokens": 60,
                },
            ),
            OpenApiExample(
                "From a free prompt, sampled",
                request_only=True,
                value={"prompt": "Describe a cosy wool scarf in two sentences.", "temperature": 0.7, "seed": 7},
            ),
            OpenApiExample(
                "Response",
                response_only=True,
                status_codes=["200"],
                media_type="application/json",
                value={
                    "model_version": {"id": 1, "name": "base-SmolLM2-135M-Instruct"},
                    "choices": [
                        {
                            "index": 0,
                            "text": "Hit the trail in the grey Trail Running Shoe: a grippy outsole …",
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 98, "completion_tokens": 61, "total_tokens": 159},
                    "seed": None,
                    "timings": {
                        "load_ms": 0.1,
                        "first_token_ms": 180.2,
                        "generate_ms": 3900.0,
                        "total_ms": 3905.2,
                        "tokens_per_second": 15.6,
                    },
                },
            ),
            OpenApiExample(
                "Stream: a piece of text",
                response_only=True,
                status_codes=["200"],
                media_type="text/event-stream",
                value={"event": "chunk", "data": '{"index": 0, "text": "Hit the trail"}'},
            ),
            OpenApiExample(
                "Stream: the end",
                response_only=True,
                status_codes=["200"],
                media_type="text/event-stream",
                value={
                    "event": "done",
                    "data": '{"model_version": {"id": 1, "name": "base-SmolLM2-135M-Instruct"}, "choices": [{"index": '
                    '0, "text": "Hit the trail in the grey Trail Running Shoe.", "finish_reason": "stop"}], "usage": '
                    '{"prompt_tokens": 98, "completion_tokens": 12, "total_tokens": 110}, "seed": null, "timings": '
                    '{"load_ms": 0.1, "first_token_ms": 180.2, "generate_ms": 800.0, "total_ms": 805.0, '
                    '"tokens_per_second": 15.0}}',
                },
            ),
        ],
    )
    def post(self, request):
        serializer = GenerateRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        version = self.version_resolve(request, data.get("model_version"), field="model_version")
        params = data["params"]
        [run] = self.generation_start(
            request,
            [{"params": params, "product": data.get("product"), "prompt": data.get("prompt"), "version": version}],
            max_tokens=params.max_new_tokens * params.num_return_sequences,
            field="prompt" if "prompt" in data else "product",
        )
        # What the model was asked, as validated (a product's attributes normalised, as an example stores them).
        asked = {"prompt": data["prompt"]} if "prompt" in data else {"product": data["product"]}
        if data["stream"]:
            response = StreamingHttpResponse(self._events(request, run, asked), content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
            return response
        [body] = self.generation_log_results(request, [run], [asked])
        return Response(body)

    def _events(self, request, run, asked):
        # Noted before the first chunk: a client that saw the end knows the write was noted.
        log_write = generations_pending()
        failed = True
        result, error = None, CLIENT_LEFT
        try:
            for event in run_stream(run):
                if event[0] == "chunk":
                    yield _event("chunk", {"index": event[1], "text": event[2]})
                elif event[0] == "done":
                    failed = False
                    result = event[1]
                    yield _event("done", event[1])
                else:
                    error = str(event[1])
                    yield _event("error", {"detail": error, "status": 504})
        finally:
            self.stream_end(request, [run], error=failed)
            # The stream has ended: the client has all it will get, the write costs it nothing.
            log_write(
                self.generation_log(request, [run], [asked], results=None if result is None else [result], error=error)
            )


class ModelListView(ClientAPIView):
    scope = ApiKey.Scope.MODELS_READ

    @extend_schema(
        operation_id="models_list",
        parameters=retry_after_headers(429),
        summary="Model versions this caller may use, and which one is active",
        description="Without the models:unreleased scope, only released versions are listed: the active one and "
        "those approved for clients.",
        responses={200: ModelListSerializer, **error_responses(401, 403, 429)},
    )
    def get(self, request):
        versions = list(version_list(released_only=not self.may_use_unreleased(request)))
        active = next((v for v in versions if v.is_active), None)
        return Response(
            ModelListSerializer(
                {"active": active and {"id": active.pk, "name": active.name}, "versions": versions}
            ).data
        )


class UsageView(ClientAPIView):
    """Any valid key may read its own usage."""

    @extend_schema(
        operation_id="usage",
        summary="The calling key's limits and usage per day",
        parameters=[UsageQuerySerializer, *retry_after_headers(429)],
        responses={200: UsageResponseSerializer, **error_responses(400, 401, 429)},
    )
    def get(self, request):
        key = api_key(request)
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        since = limits.today() - datetime.timedelta(days=query.validated_data["days"] - 1)
        return Response(
            UsageResponseSerializer(
                {"key": key, "limits": limits.key_limits_now(key), "days": usage_days(key=key, since=since)}
            ).data
        )


class HealthView(APIView):
    @extend_schema(operation_id="health", summary="The process is up", responses={200: ErrorSerializer})
    def get(self, request):
        return Response({"detail": "ok"})


class ReadyView(APIView):
    """Readiness of this web process for a load balancer or an orchestrator.

    Only what this process needs to answer a generation makes the probe fail (503): the database
    (the active version, API keys, limits) and the active version in memory. The task broker, the
    training and evaluation workers and the model store are reported, never failed on: without
    them fine-tuning stops, serving does not, and they are shared by every web process, so
    failing on them would take all of them out of the load balancer at once, turning "no new jobs"
    into "no service". Each check is bounded (the broker's at READY_BROKER_TIMEOUT_SECONDS, the
    workers' read their heartbeats instead of asking them): the probe answers within about 1 s."""

    @extend_schema(
        operation_id="ready",
        summary="The database is reachable and the active model is loaded; the rest of the deployment reported",
        responses={200: ReadySerializer, 503: ReadySerializer},
    )
    def get(self, request):
        checks = {}
        try:
            connection.ensure_connection()
            checks["database"] = "ok"
        except Exception:  # any driver error means "not ready", never a 500; its text (host, port) goes to the log
            logger.exception("Readiness: the database is unreachable")
            checks["database"] = "unreachable (the log says why)"
        active = None
        if checks["database"] == "ok":
            active = active_version_get()
            checks["model"] = "no active model version" if active is None else "ok"
        if active is not None:
            # Never loads here (a probe must answer at once): a version not in memory yet is
            # being loaded in the background, and the probe says so until it is.
            if model_loaded(active):
                checks["model"] = f"ok: {active.name}"
            else:
                checks["model"] = warm_failure(active) or f"loading {active.name}"
                active_version_warm_start()  # again after a failure: the files may have been fixed
        ready = all(checks[name].startswith("ok") for name in checks) and "model" in checks
        reported = deployment_checks()
        checks.update(reported)
        warnings = [f"{name}: {value}" for name, value in reported.items() if not value.startswith("ok")]
        return Response(
            ReadySerializer({"ready": ready, "checks": checks, "warnings": warnings}).data,
            status=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
        )


@require_safe
def metrics(request):
    """Prometheus metrics. Open to whoever reaches the web process, as exporters usually are:
    Prometheus scrapes each web process from inside the deployment's network, and the public
    proxy should not pass /metrics on. With METRICS_TOKEN set, only a request bearing it
    ("Authorization: Bearer <token>", Prometheus' `authorization` setting) gets them: for a
    network shared with others. The metrics name no client, key or prompt either way."""
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            response = HttpResponse("A valid METRICS_TOKEN is needed as a bearer token.\n", status=401)
            response["Content-Type"] = "text/plain; charset=utf-8"
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    body, content_type = telemetry.scrape()
    response = HttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
