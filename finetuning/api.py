"""Fine-tuning jobs over HTTP: start, watch, cancel. HTTP only; the work is in services.

Training costs hours of a GPU: an API key needs the jobs:read / jobs:write scope
and its owner the job permissions the admin checks (view, add, change); a
person's HTTP Basic credentials or admin session need those permissions."""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import exceptions, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.response import Response

from finetuning.hyperparameters import HyperparameterError
from finetuning.selectors import dataset_get, jobs_recent, version_get
from finetuning.serializers import JobSerializer, JobStartSerializer
from finetuning.services.jobs import JobError, job_cancel, job_retrain, job_start
from finetuning.services.workers import BrokerUnavailable
from inference.auth import ApiKeyAuthentication, ThrottledBasicAuthentication
from inference.clients import ClientAPIView
from inference.errors import ServiceUnavailable
from inference.models import ApiKey
from inference.schema import error_responses, retry_after_headers

_ERRORS = {401: "No credentials: an API key (Bearer), HTTP Basic or an admin session."}
# What a client is told to wait (Retry-After) when the task broker cannot be reached.
BROKER_RETRY_AFTER_SECONDS = 30


class JobAPIView(ClientAPIView):
    authentication_classes = [ApiKeyAuthentication, ThrottledBasicAuthentication, SessionAuthentication]
    write_permission = "finetuning.add_finetuningjob"

    def scope_for(self, request):
        return ApiKey.Scope.JOBS_READ if request.method in ("GET", "HEAD") else ApiKey.Scope.JOBS_WRITE

    def permission_for(self, request):
        return "finetuning.view_finetuningjob" if request.method in ("GET", "HEAD") else self.write_permission

    @staticmethod
    def job_get(pk):
        return get_object_or_404(jobs_recent(), pk=pk)


class JobListView(JobAPIView):
    @extend_schema(
        operation_id="jobs_list",
        summary="Recent fine-tuning jobs (the 50 newest)",
        parameters=retry_after_headers(429),
        responses={200: JobSerializer(many=True), **error_responses(401, 403, 429, descriptions=_ERRORS)},
    )
    def get(self, request):
        jobs = jobs_recent()[:50]
        return Response(JobSerializer(jobs, many=True).data)

    @extend_schema(
        operation_id="jobs_start",
        summary="Start a fine-tuning job",
        description="Freezes the dataset's examples into a snapshot and queues a job for a training worker. "
        "Returns 202 with the job; poll GET /api/jobs/{id} for progress.",
        request=JobStartSerializer,
        parameters=retry_after_headers(429, 503),
        responses={
            202: JobSerializer,
            **error_responses(
                400,
                401,
                403,
                404,
                409,
                413,
                415,
                429,
                503,
                descriptions={
                    **_ERRORS,
                    404: "No dataset (or model version to retrain) by that name.",
                    409: "The dataset already has a queued or running job, has nothing to train on, or the base "
                    "model is not prepared; or the version to retrain has no recipe here.",
                    503: "The task broker (or the database) cannot be reached: no job is queued, and the dataset "
                    "is free (a job made before the broker failed is marked failed). Try again after Retry-After.",
                },
            ),
        },
        examples=[
            OpenApiExample(
                "LoRA on the seed set",
                request_only=True,
                value={"dataset": "seed", "hyperparameters": {"method": "lora", "epochs": 3, "learning_rate": 2e-4}},
            ),
            OpenApiExample("Retrain a version exactly", request_only=True, value={"retrain": "seed-job4"}),
        ],
    )
    def post(self, request):
        serializer = JobStartSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            if "retrain" in data:
                version = version_get(reference=data["retrain"])
                if version is None:
                    raise exceptions.NotFound(f"retrain: no model version named {data['retrain']!r}")
                job = job_retrain(version=version, requested_by=request.user)
            else:
                dataset = dataset_get(name=data["dataset"])
                if dataset is None:
                    raise exceptions.NotFound(f"dataset: no dataset named {data['dataset']!r}")
                job = job_start(dataset=dataset, hyperparameters=data.get("hyperparameters"), requested_by=request.user)
        except HyperparameterError as exc:
            raise exceptions.ValidationError({"hyperparameters": {k: [m] for k, m in exc.errors.items()}}) from exc
        except BrokerUnavailable as exc:  # before JobError: it is one too
            raise ServiceUnavailable(str(exc), retry_after=BROKER_RETRY_AFTER_SECONDS) from exc
        except JobError as exc:  # a JobConflict too: the state of things, not the request, is in the way
            raise Conflict(str(exc)) from exc
        return Response(JobSerializer(self.job_get(job.pk)).data, status=status.HTTP_202_ACCEPTED)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class JobDetailView(JobAPIView):
    @extend_schema(
        operation_id="jobs_get",
        summary="A job's status, progress, losses and result",
        parameters=retry_after_headers(429),
        responses={200: JobSerializer, **error_responses(401, 403, 404, 429, descriptions=_ERRORS)},
    )
    def get(self, request, pk):
        return Response(JobSerializer(self.job_get(pk)).data)


class JobCancelView(JobAPIView):
    write_permission = "finetuning.change_finetuningjob"

    @extend_schema(
        operation_id="jobs_cancel",
        summary="Cancel a job",
        description="A queued job is cancelled at once; a running one stops at its next training step "
        "(poll until its status is `cancelled`). No model version is created.",
        request=None,
        parameters=retry_after_headers(429),
        responses={
            202: JobSerializer,
            **error_responses(401, 403, 404, 409, 429, descriptions={**_ERRORS, 409: "The job has already finished."}),
        },
    )
    def post(self, request, pk):
        try:
            job = job_cancel(job=self.job_get(pk))
        except JobError as exc:
            raise Conflict(str(exc)) from exc
        return Response(JobSerializer(self.job_get(job.pk)).data, status=status.HTTP_202_ACCEPTED)
