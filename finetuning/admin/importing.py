"""Importing examples into a dataset from the browser, and exporting a dataset.

Upload (kept on the server, one folder per upload) -> review: the mapping in import_examples'
own language, the first rows as they would be stored with the prompt the model sees, and the
dry run -> confirm, all or nothing. The screens only call finetuning.services.importing, the
code the command runs, so the browser and the shell import a file the same way.
"""

import json
import shlex
from pathlib import Path

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from finetuning.models import Dataset
from finetuning.services.exporting import FORMATS, dataset_export, export_filename
from finetuning.services.importing import (
    ImportFileError,
    examples_dry_run,
    examples_import,
    rejected_rows_csv,
    upload_get,
    upload_mapping_set,
    upload_save,
)

STATUS_LABELS = {
    "new": "will be created",
    "duplicate": "skipped",
    "existing": "skipped",
    "rejected": "rejected",
}
MAX_LISTED_ROWS = 50


class ImportUploadForm(forms.Form):
    file = forms.FileField(label="CSV or JSONL file")
    dataset = forms.ModelChoiceField(
        Dataset.objects.all(), required=False, empty_label="— a new dataset —", label="Into dataset"
    )
    new_dataset = forms.CharField(required=False, max_length=100, label="New dataset's name")

    def __init__(self, *args, dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed_dataset = dataset
        if dataset is not None:
            del self.fields["dataset"], self.fields["new_dataset"]

    def clean(self):
        cleaned = super().clean()
        if self.fixed_dataset is not None:
            cleaned["dataset_name"] = self.fixed_dataset.name
            return cleaned
        chosen, new = cleaned.get("dataset"), (cleaned.get("new_dataset") or "").strip()
        if chosen and new:
            self.add_error("new_dataset", "Pick an existing dataset or name a new one, not both.")
        elif chosen:
            cleaned["dataset_name"] = chosen.name
        elif not new:
            self.add_error("new_dataset", "Pick a dataset above, or name a new one here.")
        elif Dataset.objects.filter(name=new).exists():
            self.add_error("new_dataset", f"A dataset named {new} already exists: pick it in the list above.")
        else:
            cleaned["dataset_name"] = new
        return cleaned


class ImportMappingForm(forms.Form):
    mapping = forms.CharField(
        required=False,
        label="Columns",
        widget=forms.Textarea(attrs={"rows": 9, "cols": 60, "spellcheck": "false", "class": "import-mapping"}),
        help_text="One TARGET=COLUMN per line, as import_examples --map. COLUMN+COLUMN joins several columns. "
        "Targets: description, split, and attributes (name, brand, category, color, audience, price, currency, "
        "features, keywords, or any other name). Columns not named here are left out.",
    )
    constants = forms.CharField(
        required=False,
        label="Every row gets",
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60, "spellcheck": "false", "class": "import-mapping"}),
        help_text="One KEY=VALUE per line, as --set: e.g. currency=USD or brand=adidas, for rows without one.",
    )


class ImportExportMixin:
    """The dataset admin's import and export screens."""

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("import/", view(self.import_view), name="finetuning_dataset_import"),
            path("<int:pk>/import/", view(self.import_view), name="finetuning_dataset_import_into"),
            path("import/<str:token>/", view(self.import_review_view), name="finetuning_dataset_import_review"),
            path(
                "import/<str:token>/rejected.csv",
                view(self.import_rejected_view),
                name="finetuning_dataset_import_rejected",
            ),
            path("<int:pk>/export/<str:fmt>/", view(self.export_view), name="finetuning_dataset_export"),
            *super().get_urls(),
        ]

    def _context(self, request, **extra):
        return {**self.admin_site.each_context(request), "opts": self.model._meta, **extra}

    def _upload(self, request, token):
        if not request.user.has_perm("finetuning.add_trainingexample"):
            raise PermissionDenied
        try:
            return upload_get(user=request.user, token=token)
        except LookupError as exc:
            raise Http404("No such upload: it was made by someone else, or cleaned up after a day.") from exc

    def import_view(self, request, pk=None):
        if not request.user.has_perm("finetuning.add_trainingexample"):
            raise PermissionDenied
        dataset = get_object_or_404(Dataset, pk=pk) if pk is not None else None
        form = ImportUploadForm(request.POST or None, request.FILES or None, dataset=dataset)
        if request.method == "POST" and form.is_valid():
            name = form.cleaned_data["dataset_name"]
            if not Dataset.objects.filter(name=name).exists() and not request.user.has_perm("finetuning.add_dataset"):
                raise PermissionDenied
            try:
                upload = upload_save(user=request.user, uploaded_file=form.cleaned_data["file"], dataset_name=name)
            except ImportFileError as exc:
                form.add_error("file", f"{exc}. Nothing was imported.")
            else:
                return redirect("admin:finetuning_dataset_import_review", upload.token)
        title = f"Import examples into {dataset.name}" if dataset else "Import examples"
        context = self._context(
            request,
            title=title,
            dataset=dataset,
            form=form,
            limit=filesizeformat(settings.IMPORT_MAX_UPLOAD_BYTES),
        )
        return TemplateResponse(request, "admin/finetuning/dataset/import.html", context)

    def import_review_view(self, request, token):
        upload = self._upload(request, token)
        meta = upload.meta
        if request.method == "POST" and "confirm" in request.POST:
            return self._import_confirm(request, upload)
        if request.method == "POST":
            form = ImportMappingForm(request.POST)
            if form.is_valid():
                try:
                    upload_mapping_set(
                        upload=upload,
                        mapping_items=form.cleaned_data["mapping"],
                        constant_items=form.cleaned_data["constants"],
                    )
                except ImportFileError as exc:
                    field = "constants" if str(exc).startswith("constant") else "mapping"
                    form.add_error(field, str(exc))
                else:
                    return redirect("admin:finetuning_dataset_import_review", upload.token)
            summary, error = None, None
        else:
            form = ImportMappingForm(
                initial={"mapping": "\n".join(meta["mapping"]), "constants": "\n".join(meta["constants"])}
            )
            summary, error = _dry_run(upload)
        dataset = Dataset.objects.filter(name=meta["dataset"]).first()
        context = self._context(
            request,
            title=f"Import {meta['name']} into {meta['dataset']}",
            upload=upload,
            meta=meta,
            dataset=dataset,
            form=form,
            summary=summary,
            error=error,
            columns=_columns(meta),
            preview=[_preview_row(row) for row in summary.preview] if summary else [],
            rejected=summary.rejected[:MAX_LISTED_ROWS] if summary else [],
            duplicate_rows=_duplicate_rows(summary) if summary else [],
            command=_command_line(meta),
            expected=json.dumps(summary.counts()) if summary else "",
            mapping_json=json.dumps(meta["mapping"]),
            constants_json=json.dumps(meta["constants"]),
            size=filesizeformat(meta["size"]),
        )
        return TemplateResponse(request, "admin/finetuning/dataset/import_review.html", context)

    def _import_confirm(self, request, upload):
        meta = upload.meta
        review = reverse("admin:finetuning_dataset_import_review", args=[upload.token])
        if meta.get("imported"):
            self.message_user(request, f"This upload of {meta['name']} was imported already.", messages.WARNING)
            return redirect(review)
        if not Dataset.objects.filter(name=meta["dataset"]).exists() and not request.user.has_perm(
            "finetuning.add_dataset"
        ):
            raise PermissionDenied
        try:
            # The mapping the curator saw the dry run of, not one edited since in another tab.
            summary = examples_import(
                path=upload.path,
                name=meta["name"],
                dataset_name=meta["dataset"],
                mapping_items=_posted_lines(request, "mapping"),
                constant_items=_posted_lines(request, "constants"),
                suggest=False,
            )
        except ImportFileError as exc:
            # Not the error first: the admin capitalises a message's first letter, and it may be a name.
            self.message_user(request, f"Nothing was imported: {exc}.", messages.ERROR)
            return redirect(review)
        meta["imported"] = summary.counts()
        upload.meta_save()
        dataset = Dataset.objects.get(name=meta["dataset"])
        counts = summary.counts()
        details = []
        if summary.duplicates:
            details.append(
                f"skipped {_count(counts['duplicates_in_file'], 'row')} repeated within the file and "
                f"{counts['duplicates_in_dataset']} already in {dataset.name}"
            )
        if counts["rejected"]:
            details.append(f"rejected {_count(counts['rejected'], 'row')}")
        details = "; ".join(details)
        message = format_html(
            '{} imported into {} from {}.{} They are drafts: <a href="{}">review them</a>.',
            _count(counts["created"], "example"),
            dataset.name,
            meta["name"],
            f" {details[0].upper()}{details[1:]}." if details else "",
            reverse("admin:finetuning_trainingexample_changelist")
            + f"?dataset__id__exact={dataset.pk}&source__exact=import&review__exact=draft",
        )
        try:
            expected = json.loads(request.POST.get("expected") or "{}")
        except json.JSONDecodeError:
            expected = {}
        if expected and expected != counts:
            message = format_html(
                "{} {} changed since the dry run, which counted {} to create and {} already there; "
                "the numbers above are what was done.",
                message,
                dataset.name,
                expected.get("created"),
                expected.get("duplicates_in_dataset"),
            )
        if counts["rejected"]:
            message = format_html(
                '{} <a href="{}">Download the rejected rows</a>.',
                message,
                reverse("admin:finetuning_dataset_import_rejected", args=[upload.token]),
            )
        self.message_user(request, message, messages.SUCCESS)
        return redirect("admin:finetuning_dataset_change", dataset.pk)

    def import_rejected_view(self, request, token):
        upload = self._upload(request, token)
        summary, error = _dry_run(upload, preview_rows=0)
        if error:
            self.message_user(request, f"No rejected rows to download: {error}", messages.ERROR)
            return redirect("admin:finetuning_dataset_import_review", upload.token)
        response = HttpResponse(
            rejected_rows_csv(summary=summary, columns=upload.meta["columns"]), content_type="text/csv; charset=utf-8"
        )
        response["Content-Disposition"] = f'attachment; filename="{Path(upload.meta["name"]).stem}-rejected.csv"'
        return response

    def export_view(self, request, pk, fmt):
        dataset = get_object_or_404(Dataset, pk=pk)
        if not self.has_view_permission(request, dataset):
            raise PermissionDenied
        if fmt not in FORMATS:
            raise Http404(f"No export format {fmt!r}.")
        response = StreamingHttpResponse(
            dataset_export(dataset=dataset, fmt=fmt), content_type=f"{FORMATS[fmt]}; charset=utf-8"
        )
        response["Content-Disposition"] = f'attachment; filename="{export_filename(dataset=dataset, fmt=fmt)}"'
        return response


def _count(number, word):
    return f"{number} {word}{'' if number == 1 else 's'}"


def _posted_lines(request, key):
    """The mapping lines the confirm form carries (JSON), as the dry run showed them."""
    try:
        lines = json.loads(request.POST.get(key) or "[]")
    except json.JSONDecodeError:
        lines = None
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise ImportFileError(f"the form's {key} did not come through; reload the page")
    return lines


def _dry_run(upload, *, preview_rows=5):
    meta = upload.meta
    try:
        summary = examples_dry_run(
            path=upload.path,
            name=meta["name"],
            dataset_name=meta["dataset"],
            mapping_items=meta["mapping"],
            constant_items=meta["constants"],
            suggest=False,
            preview_rows=preview_rows,
        )
    except ImportFileError as exc:
        return None, str(exc)
    return summary, None


def _short(value, limit=60):
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _columns(meta):
    """The file's columns, each with a sample value and the targets it feeds."""
    targets = {}
    if not meta["mapping"] and meta["kind"] == "jsonl" and "attributes" in meta["columns"]:
        targets = {key: [f"{key}, as it is"] for key in ("attributes", "description", "split")}
    for line in meta["mapping"]:
        target, _, sources = line.partition("=")
        for column in sources.split("+"):
            targets.setdefault(column.strip(), []).append(target.strip())
    samples = meta.get("samples", {})
    return [
        {"name": column, "sample": _short(samples.get(column, "")), "targets": targets.get(column, [])}
        for column in meta["columns"]
    ]


def _preview_row(preview):
    fields = preview.fields or {}
    attributes = [
        (key, "; ".join(value) if isinstance(value, list) else value)
        for key, value in fields.get("attributes", {}).items()
    ]
    return {
        "row": preview.row,
        "status": preview.status,
        "label": STATUS_LABELS[preview.status],
        "reason": preview.reason,
        "attributes": attributes,
        "description": fields.get("description", ""),
        "split": fields.get("split", ""),
        "prompt": preview.prompt,
        "values": [(key, _short(value, 120)) for key, value in preview.values.items()],
    }


def _duplicate_rows(summary):
    rows = [(row, f"the same example as row {first}") for row, first in summary.duplicates_in_file]
    rows += [(row, f"already in {summary.dataset} (example {pk})") for row, pk in summary.duplicates_in_dataset]
    return sorted(rows)[:MAX_LISTED_ROWS]


def _command_line(meta):
    parts = ["python manage.py import_examples", shlex.quote(meta["name"]), "--dataset", shlex.quote(meta["dataset"])]
    parts += [f"--map {shlex.quote(line)}" for line in meta["mapping"]]
    parts += [f"--set {shlex.quote(line)}" for line in meta["constants"]]
    return " ".join(parts)
