"""The admin home's dashboard: ``{% load dashboard %}{% dashboard %}`` (templates/admin/index.html)."""

from datetime import timedelta

from django import template
from django.utils import timezone

from finetuning.selectors import active_version_get
from finetuning.services.workers import work_active
from inference.selectors import generations_summary

register = template.Library()


@register.inclusion_tag("admin/finetuning/dashboard.html", takes_context=True)
def dashboard(context):
    """The active version, running and queued work with its place in line, and the last
    day's generations: each part only for a user allowed to see it."""
    request = context["request"]
    user = request.user
    can_jobs = user.has_perm("finetuning.view_finetuningjob")
    can_evaluations = user.has_perm("finetuning.view_evaluation")
    work = [
        row
        for row in (work_active() if can_jobs or can_evaluations else [])
        if (can_jobs if row.kind == "job" else can_evaluations)
    ]
    now = timezone.now()
    return {
        "request": request,
        "now": now,
        "show_version": user.has_perm("finetuning.view_modelversion"),
        "active_version": active_version_get(),
        "show_work": can_jobs or can_evaluations,
        "work": work,
        "can_cancel_job": user.has_perm("finetuning.change_finetuningjob"),
        "can_cancel_evaluation": user.has_perm("finetuning.change_evaluation"),
        "generations": generations_summary(since=now - timedelta(days=1))
        if user.has_perm("inference.view_generation")
        else None,
        "csrf_token": context.get("csrf_token"),
    }
