"""Starting fine-tuning on a dataset: the form, and its pre-flight of what the job
will train on (the page's script asks the pre-flight URL again as fields change)."""

from django.contrib import messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path

from finetuning.forms import FineTuneForm
from finetuning.hyperparameters import HyperparameterError, hyperparameters_parse
from finetuning.selectors import datasets_with_counts
from finetuning.services.jobs import JobError, job_start
from finetuning.services.preflight import duration_text, preflight_check, preflight_refusal

PREFLIGHT_TEMPLATE = "admin/finetuning/dataset/finetune_preflight.html"


class FineTuneMixin:
    """The dataset admin's "Start fine-tuning" screen."""

    def get_urls(self):
        return [
            path(
                "<int:pk>/finetune/",
                self.admin_site.admin_view(self.finetune_view),
                name="finetuning_dataset_finetune",
            ),
            path(
                "<int:pk>/finetune/preflight/",
                self.admin_site.admin_view(self.finetune_preflight_view),
                name="finetuning_dataset_finetune_preflight",
            ),
            *super().get_urls(),
        ]

    def _finetune_dataset(self, request, pk):
        if not request.user.has_perm("finetuning.add_finetuningjob"):
            raise PermissionDenied
        return get_object_or_404(datasets_with_counts(), pk=pk)

    @staticmethod
    def _preflight(dataset, form):
        """The pre-flight of the form's settings; None while the form has errors (added to it)."""
        if form.is_bound and not form.is_valid():
            return None
        try:
            hp = hyperparameters_parse(form.hyperparameters())
        except HyperparameterError as exc:
            for key, message in exc.errors.items():
                form.add_error(key if key in form.fields else None, message)
            return None
        return preflight_check(dataset=dataset, hp=hp)

    @staticmethod
    def _preflight_context(form, preflight):
        confirmed = form.is_bound and preflight is not None and form.data.get("confirm_examples") == str(preflight.kept)
        estimate = preflight.estimate if preflight else None
        return {
            "preflight": preflight,
            "confirmed": confirmed,
            "duration": duration_text(estimate.seconds) if estimate and estimate.seconds is not None else "",
        }

    def finetune_view(self, request, pk):
        dataset = self._finetune_dataset(request, pk)
        if request.method == "POST":
            form = FineTuneForm(request.POST)
        else:
            form = FineTuneForm(preset=request.GET.get("preset"))
        preflight = self._preflight(dataset, form)
        # Enter in a field presses the first button, "Check": only the start button starts.
        if request.method == "POST" and "_check" not in request.POST and preflight is not None:
            refusal = preflight_refusal(preflight, confirmed_examples=form.cleaned_data["confirm_examples"])
            if refusal:
                form.add_error("max_seq_length", refusal)
            else:
                try:
                    job = job_start(dataset=dataset, hyperparameters=form.hyperparameters(), requested_by=request.user)
                except HyperparameterError as exc:
                    for key, message in exc.errors.items():
                        form.add_error(key if key in form.fields else None, message)
                except JobError as exc:
                    form.add_error(None, str(exc))
                else:
                    self.message_user(request, f"Fine-tuning job {job.pk} queued on {dataset.name}.", messages.SUCCESS)
                    return redirect("admin:finetuning_finetuningjob_change", job.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Start fine-tuning on {dataset.name}",
            "dataset": dataset,
            "form": form,
            "adminform": helpers.AdminForm(form, list(form.fieldsets), {}, model_admin=self),
            "errors": helpers.AdminErrorList(form, []),
            "presets": FineTuneForm.preset_values(),
            "opts": self.model._meta,
            **self._preflight_context(form, preflight),
        }
        return TemplateResponse(request, "admin/finetuning/dataset/finetune.html", context)

    def finetune_preflight_view(self, request, pk):
        """The pre-flight for the settings in the query string, as JSON with its HTML."""
        dataset = self._finetune_dataset(request, pk)
        form = FineTuneForm(request.GET)
        preflight = self._preflight(dataset, form)
        html = render_to_string(PREFLIGHT_TEMPLATE, {"form": form, **self._preflight_context(form, preflight)}, request)
        if preflight is None:
            return JsonResponse({"errors": form.errors.get_json_data(), "html": html}, status=400)
        return JsonResponse(
            {
                "html": html,
                "examples": preflight.examples,
                "skipped": preflight.skipped,
                "truncated": preflight.truncated,
                "needs_confirmation": preflight.needs_confirmation,
                "estimated_seconds": preflight.estimate.seconds if preflight.estimate else None,
            }
        )
