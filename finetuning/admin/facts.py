"""Fact terms: the curators' additions to the vocabulary of the unsupported-claims metric."""

from django.contrib import admin

from finetuning.facts import shipped_terms
from finetuning.models import FactTerm


@admin.register(FactTerm)
class FactTermAdmin(admin.ModelAdmin):
    list_display = ("term", "kind", "created_at")
    list_filter = ("kind",)
    search_fields = ("term",)
    fields = ("term", "kind")

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "shipped_terms": sorted(shipped_terms().items())}
        return super().changelist_view(request, extra_context=extra_context)
