"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions and
/v1/chat/completions, answered in OpenAI's shapes (errors included) so that the
official client and the tools built on it work unchanged. HTTP only: the
generation is the native API's (inference.clients, inference.services)."""

import json
import secrets
import time

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.response import Response

from finetuning.selectors import version_list
from inference.clients import CLIENT_LEFT, ClientAPIView, GenerationLogMixin
from inference.errors import openai_error, openai_exception_handler
from inference.models import ApiKey, Generation
from inference.openai_compat.serializers import (
    ChatCompletionRequestSerializer,
    ChatCompletionSerializer,
    CompletionRequestSerializer,
    CompletionSerializer,
    OpenAIModelListSerializer,
    OpenAIModelSerializer,
)
from inference.schema import error_responses, retry_after_headers, sse_schema
from inference.services.generation import run_stream
from inference.services.generation_log import generations_pending

ACTIVE = "active"
_TAGS = ["OpenAI-compatible"]


def _model(name, created):
    return {"id": name, "object": "model", "created": int(created.timestamp()), "owned_by": "genapi"}


def _fingerprint(version):
    return f"fp_{version.sha256[:10]}"


class OpenAIView(ClientAPIView):
    def get_exception_handler(self):
        return openai_exception_handler

    def model_resolve(self, request, name):
        """The version ``model`` names (``active``: the active one) if this key may use it."""
        if name.strip() == ACTIVE:
            return self.version_resolve(request, None, field="model")
        try:
            return self.version_resolve(request, name, field="model")
        except exceptions.NotFound as exc:
            error = exceptions.NotFound(
                f"The model {name!r} does not exist or you do not have access to it (GET /v1/models lists them).",
                code="model_not_found",
            )
            error.param = "model"
            raise error from exc


class ModelListView(OpenAIView):
    scope = ApiKey.Scope.MODELS_READ

    @extend_schema(
        operation_id="openai_models_list",
        tags=_TAGS,
        summary="The model versions this key may use (OpenAI's shape)",
        description="`active` comes first: an alias of the version active now. Without the models:unreleased "
        "scope, only released versions are listed (the active one and those approved for clients).",
        parameters=retry_after_headers(429),
        responses={200: OpenAIModelListSerializer, **error_responses(401, 403, 429, openai=True)},
    )
    def get(self, request):
        versions = list(version_list(released_only=not self.may_use_unreleased(request)))
        active = next((v for v in versions if v.is_active), None)
        data = [_model(ACTIVE, active.activated_at or active.created_at)] if active else []
        data += [_model(version.name, version.created_at) for version in versions]
        return Response({"object": "list", "data": data})


class ModelDetailView(OpenAIView):
    scope = ApiKey.Scope.MODELS_READ

    @extend_schema(
        operation_id="openai_models_retrieve",
        tags=_TAGS,
        summary="One model version (OpenAI's shape)",
        parameters=[OpenApiParameter("model", OpenApiTypes.STR, OpenApiParameter.PATH), *retry_after_headers(429)],
        responses={200: OpenAIModelSerializer, **error_responses(401, 403, 404, 429, openai=True)},
    )
    def get(self, request, model):
        version = self.model_resolve(request, model)
        created = version.activated_at if model == ACTIVE and version.activated_at else version.created_at
        return Response(_model(model if model == ACTIVE else version.name, created))


class _GenerateView(GenerationLogMixin, OpenAIView):
    """What completions and chat completions share: one flow, two shapes. The generation
    log gets one record per returned text (n texts for each prompt), as the native API's."""

    scope = ApiKey.Scope.GENERATE
    serializer_class = None
    object_name = None

    def post(self, request):
        serializer = self.serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        version = self.model_resolve(request, data["model"])
        params = data["params"]
        inputs = data["inputs"]
        runs = self.generation_start(
            request,
            [{"params": params, "version": version, **spec} for spec in inputs],
            max_tokens=params.max_new_tokens * params.num_return_sequences * len(inputs),
            field="prompt" if self.object_name == "text_completion" else "messages",
        )
        answer = {
            "id": f"{self.id_prefix}-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": version.name,
            "system_fingerprint": _fingerprint(version),
        }
        if data.get("stream"):
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            response = StreamingHttpResponse(
                self._events(request, runs, inputs, answer, params.num_return_sequences, include_usage),
                content_type="text/event-stream",
            )
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            return response
        results = self.generation_log_results(request, runs, inputs)
        choices = []
        for offset, result in enumerate(results):
            for choice in result["choices"]:
                index = offset * params.num_return_sequences + choice["index"]
                choices.append(self.choice(index, choice["text"], choice["finish_reason"]))
        usage = _usage(results)
        return Response({**answer, "object": self.object_name, "choices": choices, "usage": usage})

    def _events(self, request, runs, inputs, answer, n, include_usage):
        """OpenAI's stream: ``data: {chunk}`` lines, usage in a last chunk when asked, then
        ``data: [DONE]``; a timeout ends it with ``data: {"error": ...}``."""
        base = {**answer, "object": f"{self.object_name}.chunk" if self.chat else self.object_name}
        extra = {"usage": None} if include_usage else {}

        def chunk(choices, **more):
            return _data({**base, "choices": choices, **extra, **more})

        # Noted before the first chunk: a client that saw the end knows the write was noted.
        log_write = generations_pending()
        failed = True
        results, error = [], CLIENT_LEFT
        try:
            if self.chat:
                yield chunk([self.delta(i, role=True) for i in range(n * len(runs))])
            for offset, run in enumerate(runs):
                for event in run_stream(run):
                    if event[0] == "chunk":
                        yield chunk([self.delta(offset * n + event[1], text=event[2])])
                    elif event[0] == "error":
                        error = str(event[1])
                        yield _data(openai_error(error, type="server_error", code="timeout"))
                        return
                    else:
                        results.append(event[1])
                        yield chunk(
                            [
                                self.delta(offset * n + c["index"], finish_reason=c["finish_reason"])
                                for c in event[1]["choices"]
                            ]
                        )
            failed = False
            if include_usage:
                yield _data({**base, "choices": [], "usage": _usage(results)})
            yield b"data: [DONE]\n\n"
        finally:
            for run in runs:
                run.generation.cancel()
            self.stream_end(request, runs, error=failed)
            # The stream has ended: the client has all it will get, the write costs it nothing.
            log_write(self.generation_log(request, runs, inputs, results=results, error=error))


def _data(body):
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def _usage(results):
    prompt = sum(result["usage"]["prompt_tokens"] for result in results)
    completion = sum(result["usage"]["completion_tokens"] for result in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_STREAM_DESCRIPTION = (
    "With `stream: true`: OpenAI's server-sent events. Each event is `data: {chunk}` and a blank line: "
    '`{id, object: "%s", created, model, system_fingerprint, choices: [...]}` with the text as it is '
    "produced, a last chunk per choice with its `finish_reason`, with `stream_options.include_usage` a chunk "
    "with no choices and the `usage`, then `data: [DONE]`. If the time limit passes, the stream ends with "
    '`data: {"error": {...}}` instead.'
)

# Each event's data is a chunk as JSON, an {"error": ...} object, or the closing [DONE].
_STREAM_SCHEMA = sse_schema({None: None})

_SHARED_ERRORS = error_responses(
    400, 401, 403, 404, 413, 415, 429, 503, 504, openai=True, descriptions={404: "No such model version."}
)


class CompletionView(_GenerateView):
    log_route = Generation.Route.COMPLETIONS
    serializer_class = CompletionRequestSerializer
    object_name = "text_completion"
    id_prefix = "cmpl"
    chat = False

    @staticmethod
    def choice(index, text, finish_reason):
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def delta(index, text="", finish_reason=None, role=False):
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    @extend_schema(
        operation_id="openai_completions",
        tags=_TAGS,
        summary="Write text from a prompt or a product (OpenAI's completions)",
        description="The prompt is an instruction, set in the model's chat format after the shop's system message "
        "(as the native API's `prompt`), or give product attributes in the `product` extension field.",
        request=CompletionRequestSerializer,
        parameters=retry_after_headers(429, 503),
        responses={
            (200, "application/json"): CompletionSerializer,
            (200, "text/event-stream"): OpenApiResponse(
                _STREAM_SCHEMA, description=_STREAM_DESCRIPTION % "text_completion"
            ),
            **_SHARED_ERRORS,
        },
        examples=[
            OpenApiExample(
                "A product (extension field)",
                request_only=True,
                value={"model": "active", "prompt": "", "product": {"name": "Trail Running Shoe", "color": "Grey"}},
            ),
            OpenApiExample(
                "An instruction, sampled",
                request_only=True,
                value={"model": "active", "prompt": "Describe a wool scarf.", "max_tokens": 60, "seed": 7},
            ),
        ],
    )
    def post(self, request):
        return super().post(request)


class ChatCompletionView(_GenerateView):
    log_route = Generation.Route.CHAT
    serializer_class = ChatCompletionRequestSerializer
    object_name = "chat.completion"
    id_prefix = "chatcmpl"
    chat = True

    @staticmethod
    def choice(index, text, finish_reason):
        return {
            "index": index,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    @staticmethod
    def delta(index, text=None, finish_reason=None, role=False):
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    @extend_schema(
        operation_id="openai_chat_completions",
        tags=_TAGS,
        summary="Write text from a chat or a product (OpenAI's chat completions)",
        description="Product attributes go in the `product` extension field (with no messages), or as the only "
        "message: a user message whose content is a JSON object with a `name`. Either way the model gets the "
        "prompt it was fine-tuned on, and the same text as POST /api/generate with the same product and seed.",
        request=ChatCompletionRequestSerializer,
        parameters=retry_after_headers(429, 503),
        responses={
            (200, "application/json"): ChatCompletionSerializer,
            (200, "text/event-stream"): OpenApiResponse(
                _STREAM_SCHEMA, description=_STREAM_DESCRIPTION % "chat.completion.chunk"
            ),
            **_SHARED_ERRORS,
        },
        examples=[
            OpenApiExample(
                "A product as the only message",
                request_only=True,
                value={
                    "model": "active",
                    "messages": [{"role": "user", "content": '{"name": "Trail Running Shoe", "color": "Grey"}'}],
                },
            ),
            OpenApiExample(
                "A product (extension field), streamed with usage",
                request_only=True,
                value={
                    "model": "active",
                    "messages": [],
                    "product": {"name": "Trail Running Shoe", "color": "Grey"},
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "seed": 7,
                },
            ),
            OpenApiExample(
                "A chat",
                request_only=True,
                value={"model": "active", "messages": [{"role": "user", "content": "Describe a wool scarf."}]},
            ),
        ],
    )
    def post(self, request):
        return super().post(request)
