"""Fine-tuning jobs over HTTP: start, watch, cancel. HTTP only; the work is in services."""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import permissions, status
from rest_framework.authentication import BasicAuthentication, SessionAuthentication
from rest_framework.response import Response
from rest_framework.views import APIView

from finetuning.hyperparameters import HyperparameterError
from finetuning.models import Dataset, FineTuningJob
from finetuning.selectors import version_get
from finetuning.serializers import JobSerializer, JobStartSerializer
from finetuning.services.jobs import JobConflict, JobError, job_cancel, job_retrain, job_start
from inference.serializers import ErrorSerializer


class JobPermission(permissions.BasePermission):
    """Training costs hours of a GPU: only users with the job permissions
    (the same ones the admin checks) may start, watch or cancel jobs."""

    perms = {"GET": "finetuning.view_finetuningjob", "POST": "finetuning.add_finetuningjob"}

    def has_permission(self, request, view):
        user = request.user
        if not (user and user.is_authenticated):
            return False
        perm = getattr(view, "required_perm", None) or self.perms.get(request.method)
        return bool(perm) and user.has_perm(perm)


class JobAPIView(APIView):
    # Basic first: a script without credentials is told 401 and how to authenticate.
    authentication_classes = [BasicAuthentication, SessionAuthentication]
    permission_classes = [JobPermission]

    @staticmethod
    def job_get(pk):
        return get_object_or_404(FineTuningJob.objects.select_related("dataset", "snapshot", "requested_by"), pk=pk)


_JOB_ERRORS = {
    400: OpenApiResponse(description="Invalid request: the body names each bad field and the reason."),
    401: OpenApiResponse(ErrorSerializer, description="Not authenticated (HTTP Basic or an admin session)."),
    403: OpenApiResponse(ErrorSerializer, description="The user lacks the fine-tuning job permission."),
}


class JobListView(JobAPIView):
    @extend_schema(
        operation_id="jobs_list", summary="Recent fine-tuning jobs", responses={200: JobSerializer(many=True)}
    )
    def get(self, request):
        jobs = FineTuningJob.objects.select_related("dataset", "snapshot", "requested_by")[:50]
        return Response(JobSerializer(jobs, many=True).data)

    @extend_schema(
        operation_id="jobs_start",
        summary="Start a fine-tuning job",
        description="Freezes the dataset's examples into a snapshot and queues a job for a training worker. "
        "Returns 202 with the job; poll GET /api/jobs/{id} for progress.",
        request=JobStartSerializer,
        responses={
            202: JobSerializer,
            **_JOB_ERRORS,
            409: OpenApiResponse(ErrorSerializer, description="The dataset already has a queued or running job."),
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
            if data.get("retrain"):
                version = version_get(reference=data["retrain"])
                if version is None:
                    return Response({"retrain": [f"no model version named {data['retrain']!r}"]}, status=400)
                job = job_retrain(version=version, requested_by=request.user)
            else:
                dataset = Dataset.objects.filter(name=data["dataset"]).first()
                if dataset is None:
                    return Response({"dataset": [f"no dataset named {data['dataset']!r}"]}, status=400)
                job = job_start(dataset=dataset, hyperparameters=data["hyperparameters"], requested_by=request.user)
        except HyperparameterError as exc:
            return Response({"hyperparameters": {key: [msg] for key, msg in exc.errors.items()}}, status=400)
        except JobConflict as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        except JobError as exc:
            return Response({"dataset" if data.get("dataset") else "retrain": [str(exc)]}, status=400)
        return Response(JobSerializer(self.job_get(job.pk)).data, status=status.HTTP_202_ACCEPTED)


class JobDetailView(JobAPIView):
    @extend_schema(
        operation_id="jobs_get",
        summary="A job's status, progress, losses and result",
        responses={200: JobSerializer, **_JOB_ERRORS, 404: ErrorSerializer},
    )
    def get(self, request, pk):
        return Response(JobSerializer(self.job_get(pk)).data)


class JobCancelView(JobAPIView):
    required_perm = "finetuning.change_finetuningjob"

    @extend_schema(
        operation_id="jobs_cancel",
        summary="Cancel a job",
        description="A queued job is cancelled at once; a running one stops at its next training step "
        "(poll until its status is `cancelled`). No model version is created.",
        request=None,
        responses={
            202: JobSerializer,
            **_JOB_ERRORS,
            404: ErrorSerializer,
            409: OpenApiResponse(ErrorSerializer, description="The job has already finished."),
        },
    )
    def post(self, request, pk):
        try:
            job = job_cancel(job=self.job_get(pk))
        except JobError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(JobSerializer(self.job_get(job.pk)).data, status=status.HTTP_202_ACCEPTED)
