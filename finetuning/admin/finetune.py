"""Starting fine-tuning on a dataset: the form, and what it will train on."""

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path

from finetuning.forms import FineTuneForm
from finetuning.hyperparameters import HyperparameterError
from finetuning.selectors import datasets_with_counts
from finetuning.services.jobs import JobError, job_start


class FineTuneMixin:
    """The dataset admin's "Start fine-tuning" screen."""

    def get_urls(self):
        return [
            path(
                "<int:pk>/finetune/",
                self.admin_site.admin_view(self.finetune_view),
                name="finetuning_dataset_finetune",
            ),
            *super().get_urls(),
        ]

    def finetune_view(self, request, pk):
        if not request.user.has_perm("finetuning.add_finetuningjob"):
            raise PermissionDenied
        dataset = get_object_or_404(datasets_with_counts(), pk=pk)
        form = FineTuneForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                job = job_start(dataset=dataset, hyperparameters=form.cleaned_data, requested_by=request.user)
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
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/finetuning/dataset/finetune.html", context)
