"""ONNX export (`onnx`: trace the model's own inference code, check it with ONNX Runtime,
`OnnxDetector` to run the file) and the torch-free preprocessing a deployed model needs
(`preprocess`). Imports nothing here, so the preprocessing stays importable without torch.

`detection.export` was one module before 2026-12-06: its names (`from detection.export import
OnnxDetector`, as an earlier README wrote) still import, from `onnx`, with a FutureWarning."""
from __future__ import annotations

# the names of the module detection.export was, now in detection.export.onnx
_MOVED_TO_ONNX = ("ExportError", "ExportableDetector", "export_onnx", "runtime_metadata", "prepare_image",
                  "OnnxDetector", "check_with_onnxruntime")


def __getattr__(name: str):
    if name in _MOVED_TO_ONNX:
        import importlib
        import warnings

        warnings.warn(f"detection.export.{name} moved to detection.export.onnx.{name}: import it from there (the "
                      "old name goes in a later version)", FutureWarning, stacklevel=2)
        value = globals()[name] = getattr(importlib.import_module("detection.export.onnx"), name)  # said once
        return value
    raise AttributeError(f"module 'detection.export' has no attribute {name!r}")
