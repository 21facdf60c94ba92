"""transformers, named once for every part of lowrank: its import, the errors its config loading raises,
and its GPT-2 Conv1D layer; none of it imports transformers until asked to."""

from __future__ import annotations

from lowrank_cli.errors import require_extra

TRANSFORMERS_EXTRA = "calibrate"  # the pyproject extra that installs transformers


def require_transformers(feature: str):
    """transformers, imported now; when it is missing, a MissingExtraError naming `feature` and the extra."""
    return require_extra("transformers", TRANSFORMERS_EXTRA, feature)


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
