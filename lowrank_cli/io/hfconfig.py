"""transformers, named once for every part of lowrank: its import, the errors its config loading raises,
and its GPT-2 Conv1D layer; none of it imports transformers until asked to."""

from __future__ import annotations

from lowrank_cli.errors import MissingExtraError, require_extra

TRANSFORMERS_EXTRA = "calibrate"  # the pyproject extra that installs transformers
# from_pretrained(dtype=...) (4.56) and PreTrainedModel.initialize_weights (5), which lowrank calls; the
# extras in pyproject.toml ask for the same
TRANSFORMERS_MAJOR = 5


def require_transformers(feature: str):
    """transformers, imported now; when it is missing or older than TRANSFORMERS_MAJOR, a MissingExtraError
    naming `feature` and the extra."""
    transformers = require_extra("transformers", TRANSFORMERS_EXTRA, feature)
    version = str(getattr(transformers, "__version__", "0"))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < TRANSFORMERS_MAJOR:
        raise MissingExtraError(
            f"{feature} needs transformers {TRANSFORMERS_MAJOR} or newer, not {version};"
            f" pip install -U 'lowrank[{TRANSFORMERS_EXTRA}]'"
        )
    return transformers


def config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config.json it cannot use: unreadable, not JSON, wrong fields or types."""
    errors: tuple[type[Exception], ...] = (OSError, ValueError, AttributeError, TypeError, KeyError, RecursionError)
    try:  # transformers 5 validates config fields with huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return errors
    return (*errors, StrictDataclassError)


def is_conv1d(module: object) -> bool:
    """transformers' GPT-2 Conv1D (y = x·W + b, W stored (in, out)), recognized by name so torch alone suffices."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None
