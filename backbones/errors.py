"""The one error type of the weight loaders (kept apart so every loader module can raise it), and
the weights paths that mean "no weights" to a user but not to YAML."""

# "no value" as Python spells it, or as a command-line flag passes it: a path here, which the
# error for a missing file follows with YAML's spelling (null); both weight loaders use it
NULL_LOOKALIKES = ("None", "none", "NULL", "Null")


class WeightsError(ValueError):
    """Weights that cannot be used: a missing file, a refused pickle, a shape mismatch.
    The message names the file (and the key, where one is at fault)."""
