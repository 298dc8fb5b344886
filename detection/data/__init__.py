"""Data: COCO / PASCAL VOC readers, synthetic shapes, transforms and loaders.

Every reader produces a `DatasetInfo` whose records share one format (see
`dataset_info.DatasetInfo`): boxes float32 XYXY in 0-based continuous pixel
coordinates, labels 1..K. File-format conventions (COCO XYWH, VOC 1-based
pixels) exist only inside `coco.py` / `voc.py`.
"""


class DataError(ValueError):
    """Bad user data: a missing/unreadable file or an inconsistent annotation.

    The message always names the file (and the annotation or object inside it).
    """


# Public names -> defining submodule. Loaded on first use (PEP 562) so that
# `from detection.data import DataError` or tools/make_shapes.py do not pay
# for importing torch and albumentations.
_EXPORTS = {
    "DatasetInfo": "dataset_info",
    "KNOWN_DATASETS": "catalog",
    "concat_datasets": "catalog",
    "get_dataset": "catalog",
    "get_datasets": "catalog",
    "read_image": "image_io",
    "build_test_loader": "loader",
    "build_train_loader": "loader",
    "SHAPE_CLASSES": "shapes",
    "generate_shapes": "shapes",
    "build_transforms": "transforms",
    "resize_shorter_side": "transforms",
    "VOC_CLASSES": "voc",
}

__all__ = ["DataError", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
