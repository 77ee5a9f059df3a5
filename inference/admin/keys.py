"""Admin screens for API keys and their usage. Every write goes through a service,
as the command does; the full key is shown once, on the page that follows its
making, and stored nowhere."""

import datetime

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from inference import limits
from inference.models import ApiKey, ApiKeyUsage
from inference.selectors import usage_days
from inference.services.keys import LIMIT_FIELDS, ApiKeyError, key_create, key_revoke, key_update


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=ApiKey.Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=ApiKey.DEFAULT_SCOPES,
        help_text="generate covers /api/generate and /v1/(chat/)completions. Job scopes act only within the "
        "owner's own permissions on fine-tuning jobs (view; add and change).",
    )

    class Meta:
        model = ApiKey
        fields = ("name", "owner", "scopes", "expires_at", *LIMIT_FIELDS)
        widgets = {"name": forms.TextInput(attrs={"size": 60})}

    def clean_expires_at(self):
        value = self.cleaned_data.get("expires_at")
        if value is not None and value <= timezone.now():
            raise forms.ValidationError("An expiry must be in the future.")
        return value


class ApiKeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("usable", "Usable"), ("revoked", "Revoked"), ("expired", "Expired")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "usable":
            return queryset.filter(revoked_at__isnull=True).exclude(expires_at__lte=now)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        return queryset


def key_status(key):
    if key.revoked_at is not None:
        return f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
    if key.expires_at is not None and key.expires_at <= timezone.now():
        return f"expired {key.expires_at:%Y-%m-%d %H:%M}"
    if not key.owner.is_active:
        return "owner deactivated"
    return "usable"


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ("name", "prefix_display", "owner", "scopes_display", "limits_display", "status",
                    "last_used_at", "expires_at", "created_at")  # fmt: skip
    list_filter = (ApiKeyStatusFilter, "owner")
    search_fields = ("name", "prefix", "owner__username")
    list_select_related = ("owner",)
    actions = ("revoke_selected",)
    change_form_template = "admin/inference/apikey/change_form.html"

    def get_fields(self, request, obj=None):
        if obj is None:
            return ApiKeyForm.Meta.fields
        return ("name", "prefix_display", "owner", "status", "scopes", "expires_at", *LIMIT_FIELDS,
                "limits_now", "usage_recent", "last_used_at", "created_by", "created_at")  # fmt: skip

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        readonly = ("prefix_display", "owner", "status", "limits_now", "usage_recent", "last_used_at", "created_by",
                    "created_at")  # fmt: skip
        if obj.revoked_at is not None:  # a revoked key stays as it was when revoked
            return (*readonly, "name", "scopes", "expires_at", *LIMIT_FIELDS)
        return readonly

    def get_changeform_initial_data(self, request):
        return {"owner": request.user.pk, **super().get_changeform_initial_data(request)}

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: usage and the key's history stay

    def has_revoke_permission(self, request):
        return request.user.has_perm("inference.change_apikey")

    @admin.display(description="key")
    def prefix_display(self, obj):
        return format_html("<code>{}…</code>", obj.prefix)

    @admin.display(description="scopes")
    def scopes_display(self, obj):
        return ", ".join(obj.scopes)

    @admin.display(description="limits (req/min, tokens/min, tokens/day)")
    def limits_display(self, obj):
        return " / ".join(str(obj.limit(name) or "–") for name in LIMIT_FIELDS)

    @admin.display(description="status")
    def status(self, obj):
        return key_status(obj)

    @admin.display(description="now")
    def limits_now(self, obj):
        rows = [
            (name.replace("_", " "), "–" if value["used"] is None else value["used"], value["limit"] or "no limit")
            for name, value in limits.key_limits_now(obj).items()
        ]
        return format_html(
            "<table><tr><th>limit</th><th>used</th><th>of</th></tr>{}</table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )

    @admin.display(description="usage, last 14 days (UTC)")
    def usage_recent(self, obj):
        rows = [
            (row.day, row.requests, row.errors, row.prompt_tokens, row.completion_tokens)
            for row in usage_days(key=obj, since=limits.today() - datetime.timedelta(days=13))
        ]
        if not rows:
            return "No requests in the last 14 days."
        return format_html(
            "<table><tr><th>day</th><th>requests</th><th>errors</th><th>prompt tokens</th>"
            "<th>generated tokens</th></tr>{}</table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        limit_values = {name: data.get(name) for name in LIMIT_FIELDS}
        try:
            if change:
                if obj.revoked_at is None:
                    key_update(
                        key=obj, name=data["name"], scopes=data["scopes"], expires_at=data["expires_at"], **limit_values
                    )
                return
            key, raw = key_create(
                name=data["name"],
                owner=data["owner"],
                scopes=data["scopes"],
                expires_at=data["expires_at"],
                created_by=request.user,
                **limit_values,
            )
        except ApiKeyError as exc:  # the form checked these; a race (owner deactivated) remains
            raise PermissionDenied(str(exc)) from exc
        obj.pk, obj.prefix = key.pk, key.prefix
        request.new_api_key = raw

    def save_related(self, request, form, formsets, change):
        pass  # no related rows: the service wrote everything

    def response_add(self, request, obj, post_url_continue=None):
        """The one page that shows the full key."""
        key = ApiKey.objects.get(pk=obj.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"API key {key.name!r} made",
            "key": key,
            "raw_key": request.new_api_key,
            "opts": self.model._meta,
        }
        # admin_view already marks admin pages never_cache (no-store): the key stays in no cache.
        return TemplateResponse(request, "admin/inference/apikey/created.html", context)

    def get_urls(self):
        return [
            path("<int:pk>/revoke/", self.admin_site.admin_view(self.revoke_view), name="inference_apikey_revoke"),
            *super().get_urls(),
        ]

    def revoke_view(self, request, pk):
        if request.method != "POST":
            return redirect("admin:inference_apikey_change", pk)
        if not self.has_revoke_permission(request):
            raise PermissionDenied
        key = key_revoke(key=get_object_or_404(ApiKey, pk=pk))
        self.message_user(request, f"Key {key} is revoked: every request with it now gets a 401.", messages.SUCCESS)
        return redirect("admin:inference_apikey_change", pk)

    @admin.action(description="Revoke the selected keys", permissions=["revoke"])
    def revoke_selected(self, request, queryset):
        keys = [key_revoke(key=key) for key in queryset.filter(revoked_at__isnull=True)]
        self.message_user(request, f"Revoked {len(keys)} key(s).", messages.SUCCESS)


@admin.register(ApiKeyUsage)
class ApiKeyUsageAdmin(admin.ModelAdmin):
    list_display = ("day", "key", "requests", "errors", "prompt_tokens", "completion_tokens")
    list_filter = ("key",)
    date_hierarchy = "day"
    list_select_related = ("key",)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
