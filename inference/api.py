"""HTTP only: validate with a serializer, call one service, return JSON."""

import logging

from django.db import connection
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from finetuning.selectors import active_version_get, version_list
from inference.engine import QueueFull
from inference.generation import GenerationParams, GenerationTimeout, PromptTooLong
from inference.loader import ModelUnavailable, model_get
from inference.serializers import (
    ErrorSerializer,
    GenerateRequestSerializer,
    GenerateResponseSerializer,
    ModelListSerializer,
    ReadySerializer,
)
from inference.services import generation_begin, run_events, run_result

logger = logging.getLogger(__name__)

_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "num_return_sequences")


class GenerateView(APIView):
    @extend_schema(
        operation_id="generate",
        summary="Write a product description",
        request=GenerateRequestSerializer,
        responses={
            200: GenerateResponseSerializer,
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR,
                description="With `stream: true`: server-sent events. `event: chunk` with "
                '`{"index": 0, "text": "..."}` for each piece of text as it is produced; then `event: done` with '
                "the same body as the JSON answer (whole text, finish reasons, usage, model version, timings); or "
                '`event: error` with `{"detail": "...", "status": 504}` if the time limit passes. Disconnecting '
                "stops the generation.",
            ),
            400: OpenApiResponse(description="Invalid request: the body names each bad field and the reason."),
            503: OpenApiResponse(
                ErrorSerializer,
                description="No model version can be loaded, or the queue is full (then with a Retry-After header).",
            ),
            504: OpenApiResponse(ErrorSerializer, description="The answer took longer than the time limit."),
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
                    },
                    "max_new_tokens": 120,
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
        ],
    )
    def post(self, request):
        serializer = GenerateRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        params = GenerationParams(**{key: data[key] for key in _PARAMS}, stop=tuple(data["stop"]))
        try:
            run = generation_begin(
                params=params, product=data.get("product"), prompt=data.get("prompt"), version=data.get("model_version")
            )
        except PromptTooLong as exc:
            field = "prompt" if "prompt" in data else "product"
            return Response({field: [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
        except ModelUnavailable as exc:
            logger.error("Generation refused: %s", exc)
            return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        except QueueFull as exc:
            return Response(
                {"detail": str(exc)},
                status=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": str(exc.retry_after)},
            )
        headers = {"X-Model-Version": run.version.name, "X-Model-Version-Id": str(run.version.pk)}
        if data["stream"]:
            response = StreamingHttpResponse(run_events(run), content_type="text/event-stream", headers=headers)
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
            return response
        try:
            body = run_result(run)
        except GenerationTimeout as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_504_GATEWAY_TIMEOUT, headers=headers)
        return Response(body, headers=headers)


class ModelListView(APIView):
    @extend_schema(
        operation_id="models_list", summary="Model versions, and which one is active", responses=ModelListSerializer
    )
    def get(self, request):
        versions = list(version_list())
        active = next((v for v in versions if v.is_active), None)
        return Response(
            ModelListSerializer(
                {"active": active and {"id": active.pk, "name": active.name}, "versions": versions}
            ).data
        )


class HealthView(APIView):
    @extend_schema(operation_id="health", summary="The process is up", responses={200: ErrorSerializer})
    def get(self, request):
        return Response({"detail": "ok"})


class ReadyView(APIView):
    @extend_schema(
        operation_id="ready",
        summary="The database is reachable and the active model loads",
        responses={200: ReadySerializer, 503: ReadySerializer},
    )
    def get(self, request):
        checks = {}
        try:
            connection.ensure_connection()
            checks["database"] = "ok"
        except Exception as exc:  # any driver error means "not ready", never a 500
            checks["database"] = f"unreachable: {exc}"
        active = None
        if checks["database"] == "ok":
            active = active_version_get()
            checks["model"] = "no active model version" if active is None else "ok"
        if active is not None:
            try:
                model_get(active)
                checks["model"] = f"ok: {active.name}"
            except ModelUnavailable as exc:
                checks["model"] = str(exc)
        ready = all(value.startswith("ok") for value in checks.values()) and "model" in checks
        return Response(
            {"ready": ready, "checks": checks},
            status=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
        )
