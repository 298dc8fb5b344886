"""The detection toolkit (docs/ARCHITECTURE.md: its layout and layers).

Modules that moved when the house was laid out by role (2026-12-05 and 06) still import
under their old names, for code written against an earlier README (`detection.plots`,
`detection.onnx_preprocess`, `detection.fast`, ...): each gives the new module's names, with
a FutureWarning naming the new place. The old names go in a later version."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module -> its new place
MOVED_MODULES = {
    "detection.fast": "detection.accel",
    "detection.onnx_preprocess": "detection.export.preprocess",
    "detection.plots": "detection.visualization.plots",
    "detection.visualize": "detection.visualization.draw",
    **{f"detection.{name}": f"detection.modeling.{name}"
       for name in ("anchors", "box_coder", "matcher", "model", "multiscale", "precision", "refinement", "resize",
                    "roi_heads", "rpn", "sampling", "structures", "tta")},
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name (MOVED_MODULES) as a module holding its new place's names: the
    same objects, so isinstance and identity hold; the new module itself is left as it is."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        return None  # a new, empty module

    def exec_module(self, module) -> None:
        new = MOVED_MODULES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}: import it from there (the old name goes in a later "
                      "version)", FutureWarning, stacklevel=_importers_level())
        target = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
        module.__doc__ = f"Moved to {new}."


def _importers_level() -> int:
    """warnings.warn's stacklevel, from exec_module, of the line that imported: warnings skips the
    import system's frozen frames itself; importlib.import_module's own frame is one more."""
    frame = sys._getframe(2)  # exec_module's caller
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return 3 if frame is not None and frame.f_code.co_filename == importlib.__file__ else 2


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())  # last: never in the way of a module that exists
