"""Admin screens, one module per part of the curator's work. Every write goes through a
service, as the API and the commands do; reads come from selectors."""

from finetuning.admin import datasets, evaluations, examples, facts, jobs, versions  # noqa: F401 (registers)
