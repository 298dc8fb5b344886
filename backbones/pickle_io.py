"""A restricted unpickler for Caffe2/Detectron weight files ("R-50.pkl").

Those files are plain pickles (often written by Python 2) of a dict of numpy arrays,
sometimes nested as {"blobs": {...}, "cfg": "..."}. A pickle can name any importable
callable and run it while loading, so only the globals needed to rebuild numpy arrays
and plain containers are admitted; anything else is refused before it is imported.
"""
from __future__ import annotations

import codecs
import collections
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

from backbones.errors import WeightsError

# (module, name) as written in the pickle -> where the object lives in this numpy.
# numpy 2 moved numpy.core to numpy._core; old (e.g. MSRA, numpy 1 / Python 2) pickles
# use the old names, new ones the new names, so both are admitted.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
}
# Plain containers, and the helper Python 3 pickles (protocol < 3) use to store bytes.
_PLAIN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): codecs.encode,
}


def _numpy_object(location: tuple[str, str]) -> Any:
    module, name = location
    if module == "numpy":
        return getattr(importlib.import_module("numpy"), name)
    try:  # numpy >= 2
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except ImportError:  # numpy 1.x
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, numpy scalars and plain containers only."""

    def __init__(self, file: io.BufferedIOBase, path: str | Path) -> None:
        # latin1: Python 2 pickles store array data as byte strings, which numpy
        # reads back from latin1-decoded str.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_object(_NUMPY_GLOBALS[(module, name)])
        raise WeightsError(
            f"refusing to load {self._path}: the pickle references {module}.{name}, "
            "but a weights pickle may only hold numpy arrays and plain containers"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsError(f"refusing to load {self._path}: the pickle uses persistent ids ({pid!r})")


def load_numpy_pickle(path: str | Path) -> Any:
    """Unpickle `path` with NumpyOnlyUnpickler; WeightsError for refused or broken files."""
    try:
        with open(path, "rb") as file:
            return NumpyOnlyUnpickler(file, path).load()
    except WeightsError:
        raise
    except Exception as error:  # truncated file, not a pickle, bad array state, ...
        raise WeightsError(f"cannot read {path} as a Caffe2 weights pickle: {error}") from error
