"""Importing examples into a dataset from the browser, and exporting a dataset."""


class ImportExportMixin:
    """The dataset admin's import and export screens."""
