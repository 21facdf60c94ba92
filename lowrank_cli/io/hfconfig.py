"""What transformers raises for a model folder's config.json, named once for every loader of lowrank."""

from __future__ import annotations


def config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config.json it cannot use: unreadable, not JSON, wrong fields or types."""
    errors: tuple[type[Exception], ...] = (OSError, ValueError, AttributeError, TypeError, KeyError, RecursionError)
    try:  # transformers 5 validates config fields with huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return errors
    return (*errors, StrictDataclassError)
