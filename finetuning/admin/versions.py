"""Model versions: the decision page, activating, approving, evaluating, retraining and rolling back."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.html import format_html

from finetuning.admin.display import JsonFieldsMixin
from finetuning.admin.playground import PlaygroundMixin
from finetuning.charts import loss_chart
from finetuning.comparison import comparison_build
from finetuning.metrics import METRICS, metric_format
from finetuning.models import Activation, EvaluationScore, ModelVersion
from finetuning.selectors import (
    activations_recent,
    active_version_get,
    evaluation_latest,
    reactivation_get,
    versions_with_latest_scores,
)
from finetuning.services.evaluations import EvaluationError, evaluation_start
from finetuning.services.jobs import JobError, job_retrain
from finetuning.services.versions import (
    VersionError,
    version_activate,
    version_approval_withdraw,
    version_approve,
    version_rollback,
)

REASON_MAX = 1000


def training_summary(version):
    """What a version was trained on, from its metrics: examples trained on, skipped and
    truncated at its max_seq_length, and the loss training measured on the validation split;
    None for a version not trained here."""
    metrics = version.metrics or {}
    if "train_examples" not in metrics:
        return None
    snapshot = version.snapshot
    loss = metrics.get("validation_loss")
    return {
        "train_examples": metrics["train_examples"],
        "train_total": snapshot.train_examples if snapshot else None,
        "validation_examples": metrics.get("validation_examples"),
        "validation_total": snapshot.validation_examples if snapshot else None,
        "skipped": metrics.get("skipped_examples") or 0,
        "truncated": metrics.get("truncated_examples"),  # absent from versions trained before it was counted
        "max_seq_length": (version.hyperparameters or {}).get("max_seq_length"),
        "validation_loss": f"{loss:.4f}" if isinstance(loss, (int, float)) else None,
    }


@admin.register(ModelVersion)
class ModelVersionAdmin(PlaygroundMixin, JsonFieldsMixin, admin.ModelAdmin):
    # Drawn as a chart, or shown in the training summary under a name of their own: the
    # evaluation's validation loss is another number (whole descriptions, as served).
    metrics_hidden = ("loss_history", "validation_history", "validation_loss", "validation_perplexity")
    list_display = (
        "name", "kind", "is_active", "released", "base_model", "validation_loss", "rouge_l", "created_at",
        "activated_at",
    )  # fmt: skip
    list_filter = ("kind", "is_active")
    search_fields = ("name",)
    actions = ("activate_selected",)
    change_form_template = "admin/finetuning/modelversion/change_form.html"
    change_list_template = "admin/finetuning/modelversion/change_list.html"
    detail_fields = (
        "name",
        "kind",
        "is_active",
        "activated_at",
        "released",
        "approved_at",
        "approved_by",
        "base_model",
        "artifact_path",
        "sha256",
        "prompt_format_version",
        "job",
        "snapshot_display",
        "hyperparameters_display",
        "loss_chart",
        "metrics_display",
        "created_at",
    )
    fieldsets = (("Details", {"fields": detail_fields}),)
    readonly_fields = detail_fields

    def has_add_permission(self, request):
        return False  # versions come from fine-tuning jobs and prepare_base_model

    def has_change_permission(self, request, obj=None):
        return False  # nothing on a version is edited by hand: its page is read-only, without Save buttons

    def has_activate_permission(self, request):
        return request.user.has_perm("finetuning.activate_modelversion")

    @admin.display(description="released to clients", boolean=True)
    def released(self, obj):
        return obj.is_released

    @admin.display(description="data snapshot")
    def snapshot_display(self, obj):
        if obj.snapshot is None:
            return "–"
        return format_html(
            "{}: {} train, {} validation examples, sha256 <code>{}</code>",
            obj.snapshot.path,
            obj.snapshot.train_examples,
            obj.snapshot.validation_examples,
            obj.snapshot.sha256,
        )

    @admin.display(description="loss during training")
    def loss_chart(self, obj):
        metrics = obj.metrics or {}
        chart = loss_chart(
            [
                ("train loss", "#417690", metrics.get("loss_history") or []),
                ("validation loss (training)", "#d9534f", metrics.get("validation_history") or []),
            ]
        )
        return chart or "–"

    def get_queryset(self, request):
        return versions_with_latest_scores(super().get_queryset(request))

    def _own_metric(self, obj, key):
        """``key`` from the version's own latest succeeded evaluation, the one its page shows
        (not from another version's evaluation it took part in, on other examples)."""
        scores = getattr(obj, "scores_succeeded", None) or []
        score = next((s for s in scores if s.role == EvaluationScore.Role.CANDIDATE), None)
        return metric_format(key, score.metrics.get(key)) if score else "–"

    @admin.display(description=METRICS["validation_loss"].label)
    def validation_loss(self, obj):
        return self._own_metric(obj, "validation_loss")

    @admin.display(description=f"{METRICS['rouge_l'].label} (evaluation)")
    def rouge_l(self, obj):
        return self._own_metric(obj, "rouge_l")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        version = self.get_object(request, object_id)
        extra = {}
        if version is not None:
            evaluation = evaluation_latest(version=version)
            reactivation = reactivation_get() if version.is_active else None
            extra = {
                "comparison": comparison_build(evaluation) if evaluation else None,
                "evaluations": version.evaluations.all()[:10],
                "reactivation": reactivation if reactivation and reactivation.current.pk == version.pk else None,
                "training": training_summary(version),
                "active": active_version_get(),
                "can_activate": self.has_activate_permission(request),
                "can_evaluate": request.user.has_perm("finetuning.add_evaluation") and version.snapshot_id,
                "reason_max": REASON_MAX,
            }
        return super().change_view(request, object_id, form_url, {**extra, **(extra_context or {})})

    def changelist_view(self, request, extra_context=None):
        extra = {
            "reactivation": reactivation_get(),
            "active_version": active_version_get(),
            "activations": activations_recent(10),
            "can_activate": self.has_activate_permission(request),
        }
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    @admin.action(description="Activate the selected version…", permissions=["activate"])
    def activate_selected(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to activate.", messages.ERROR)
            return None
        return redirect("admin:finetuning_modelversion_activate", queryset.get().pk)

    def get_urls(self):
        return [
            path(
                "<int:pk>/activate/",
                self.admin_site.admin_view(self.activate_view),
                name="finetuning_modelversion_activate",
            ),
            path(
                "<int:pk>/evaluate/",
                self.admin_site.admin_view(self.evaluate_view),
                name="finetuning_modelversion_evaluate",
            ),
            path(
                "<int:pk>/retrain/",
                self.admin_site.admin_view(self.retrain_view),
                name="finetuning_modelversion_retrain",
            ),
            path(
                "<int:pk>/approval/",
                self.admin_site.admin_view(self.approval_view),
                name="finetuning_modelversion_approval",
            ),
            path("rollback/", self.admin_site.admin_view(self.rollback_view), name="finetuning_modelversion_rollback"),
            *super().get_urls(),
        ]

    def approval_view(self, request, pk):
        """Approve a version for clients (any API key may then ask for it by name), or withdraw that."""
        if request.method != "POST":
            return redirect("admin:finetuning_modelversion_change", pk)
        if not self.has_activate_permission(request):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=pk)
        if request.POST.get("approve") == "yes":
            version_approve(version=version, user=request.user)
            self.message_user(
                request, f"{version.name} is approved: every API key may generate with it by name.", messages.SUCCESS
            )
        else:
            version_approval_withdraw(version=version)
            note = " It stays served to everyone while it is active." if version.is_active else ""
            self.message_user(
                request,
                f"{version.name} is no longer approved: only keys with the models:unreleased scope may use it.{note}",
                messages.SUCCESS,
            )
        return redirect("admin:finetuning_modelversion_change", pk)

    def retrain_view(self, request, pk):
        if request.method != "POST":
            return redirect("admin:finetuning_modelversion_change", pk)
        if not request.user.has_perm("finetuning.add_finetuningjob"):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=pk)
        try:
            job = job_retrain(version=version, requested_by=request.user)
        except JobError as exc:
            self.message_user(request, f"Not retrained: {exc}", messages.ERROR)
            return redirect("admin:finetuning_modelversion_change", pk)
        self.message_user(request, f"Job {job.pk} retrains {version.name} on its own snapshot.", messages.SUCCESS)
        return redirect("admin:finetuning_finetuningjob_change", job.pk)

    def evaluate_view(self, request, pk):
        if request.method != "POST":
            return redirect("admin:finetuning_modelversion_change", pk)
        if not request.user.has_perm("finetuning.add_evaluation"):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=pk)
        try:
            evaluation = evaluation_start(version=version, requested_by=request.user)
        except EvaluationError as exc:
            self.message_user(request, f"Not evaluated: {exc}", messages.ERROR)
            return redirect("admin:finetuning_modelversion_change", pk)
        self.message_user(request, f"Evaluation {evaluation.pk} of {version.name} queued.", messages.SUCCESS)
        return redirect("admin:finetuning_evaluation_change", evaluation.pk)

    def activate_view(self, request, pk):
        """A confirmation that shows how this version compares with the active one, its
        reason box and button first; activating needs the confirm field and the permission.
        The version page's own Activate form posts here too."""
        if not self.has_activate_permission(request):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=pk)
        if request.method == "POST" and request.POST.get("confirm") == "yes":
            try:
                version_activate(
                    version=version,
                    user=request.user,
                    reason=request.POST.get("reason", "")[:REASON_MAX],
                    kind=Activation.Kind.MANUAL,
                    evaluation=evaluation_latest(version=version),
                )
            except VersionError as exc:
                self.message_user(request, f"Not activated: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{version.name} is now the active version.", messages.SUCCESS)
            return redirect("admin:finetuning_modelversion_change", pk)
        evaluation = evaluation_latest(version=version)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Activate {version.name}?",
            "version": version,
            "active": active_version_get(),
            "comparison": comparison_build(evaluation) if evaluation else None,
            "reason_max": REASON_MAX,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/finetuning/modelversion/activate.html", context)

    def rollback_view(self, request):
        """Undo the last activation: a page naming which way it goes (back to an older version,
        forward to a newer one) and asking why; the POST needs the reason and the version the
        page named, so a curator never activates something other than what was confirmed."""
        if not self.has_activate_permission(request):
            raise PermissionDenied
        reactivation = reactivation_get()
        if reactivation is None:
            self.message_user(request, "There is no earlier active version to return to.", messages.ERROR)
            return redirect("admin:finetuning_modelversion_changelist")
        error = ""
        reason = ""
        if request.method == "POST":
            reason = request.POST.get("reason", "")[:REASON_MAX]
            named = request.POST.get("version", "")
            expected = (
                ModelVersion.objects.filter(pk=int(named)).first() if named.isascii() and named.isdigit() else None
            )
            try:
                if expected is None:
                    raise VersionError("the form did not say which version to activate: open this page again")
                version = version_rollback(user=request.user, reason=reason, expected=expected)
            except VersionError as exc:
                error = str(exc)
            else:
                done = {"back": "Rolled back", "forward": "Rolled forward"}.get(reactivation.direction, "Re-activated")
                self.message_user(
                    request,
                    f"{done} from {reactivation.current.name}: {version.name} is the active version again.",
                    messages.SUCCESS,
                )
                return redirect("admin:finetuning_modelversion_change", version.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"{reactivation.label}?",
            "reactivation": reactivation,
            "reason": reason,
            "error": error,
            "reason_max": REASON_MAX,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/finetuning/modelversion/rollback.html", context)


@admin.register(Activation)
class ActivationAdmin(admin.ModelAdmin):
    list_display = ("created_at", "version", "previous", "kind", "user", "reason")
    list_filter = ("kind",)
    list_select_related = ("version", "previous", "user")
    readonly_fields = ("created_at", "version", "previous", "kind", "user", "reason", "evaluation")

    def has_add_permission(self, request):
        return False  # activations are recorded by activating

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # the history stays whole
