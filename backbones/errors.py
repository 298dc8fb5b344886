"""The one error type of the weight loaders (kept apart so every loader module can raise it)."""


class WeightsError(ValueError):
    """Weights that cannot be used: a missing file, a refused pickle, a shape mismatch.
    The message names the file (and the key, where one is at fault)."""
