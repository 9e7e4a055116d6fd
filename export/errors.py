"""The export error, in a module of its own: ``export.engine`` (run on the device, where torch and onnx are not
installed) raises it without importing the torch-based graph code."""

from __future__ import annotations


class ExportError(ValueError):
    """An export request that cannot be honoured (mismatched student, bad size, bad model file)."""
