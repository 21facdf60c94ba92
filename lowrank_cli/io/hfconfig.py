"""transformers, named once for every part of lowrank: its import, the errors its config loading raises,
and its GPT-2 Conv1D layer; none of it imports transformers until asked to."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


def base_prefix(model: object) -> str:
    """A transformers model's base_model_prefix ("bert", "model"); "" for a model without one."""
    return getattr(model, "base_model_prefix", "") or ""


def prefix_variants(name: str, prefix: str) -> list[str]:
    """The names one tensor has in a task-head model and in its base model (bert.encoder… and encoder…):
    [NAME, PREFIX.NAME, NAME without PREFIX.], always in this order; [NAME] without a prefix."""
    if not prefix:
        return [name]
    return [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]


@contextmanager
def quiet_transformers(*, keep_warnings: bool = False) -> Iterator[None]:
    """transformers' progress bars off (a "Loading weights" bar is noise beside a one-line error), and its
    log below errors unless keep_warnings; both as they were afterwards."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    if not keep_warnings:
        logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
