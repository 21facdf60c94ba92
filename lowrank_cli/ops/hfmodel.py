"""A Hugging Face model folder run as transformers runs it: loaded offline, its names, the text it can read.

calibrate, evaluate and heal run the dense model of a folder (its own architecture class, so a task
head runs too). `load_model` loads it, refusing a folder of lowrank factors; `checkpoint_names`
maps the loaded modules to the tensor names of the folder's files; `check_samples` refuses text
samples the model cannot read or a tokenizer that is not the model's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, UsageError, arg
from lowrank_cli.io.fileformat import find_lowrank
from lowrank_cli.io.hfconfig import config_errors, prefix_variants, quiet_transformers, require_transformers
from lowrank_cli.io.paths import require_files_in


def load_model(folder: Path, device: str, feature: str = "calibrate"):
    """The model (its own architecture class, so a task head runs too) and its tokenizer, offline.

    Args:
        folder: a Hugging Face model folder (config.json, weights, tokenizer files).
        device: where the model runs.
        feature: the command that needs transformers, named in the install hint when it is missing.

    Returns:
        (model in eval mode on `device`, tokenizer).
    """
    transformers = require_transformers(feature)
    if folder.is_dir():  # transformers reads the folder's files: none may block open() (a FIFO)
        require_files_in(folder, f"{feature} reads every file of the model folder; remove it or give a plain copy")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: has no config.json; {feature} needs a Hugging Face model folder")
    refuse_lowrank_weights(folder)
    try:
        architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
    except (OSError, ValueError, AttributeError, TypeError, IndexError, RecursionError) as exc:
        raise CheckpointError(
            f"{config_path}: is not a model config ({type(exc).__name__}: {exc}); give a Hugging Face model folder"
        ) from None
    offline = dict(local_files_only=True, trust_remote_code=False)  # never run a folder's own code, never ask
    try:  # dtype="auto": the checkpoint's own dtype, whatever this transformers version's default is
        with quiet_transformers(keep_warnings=True):  # its warnings (weights it had to initialise) still show
            model = (model_class or transformers.AutoModel).from_pretrained(folder, dtype="auto", **offline)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **offline)
    except config_errors() as exc:
        raise CheckpointError(f"{folder}: cannot be loaded with transformers ({exc})".splitlines()[0]) from None
    return model.to(device).eval(), tokenizer


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else 0 (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def refuse_lowrank_weights(folder: Path) -> None:
    """A compressed folder's factors would load as a randomly initialised model: the dense one is needed."""
    found = find_lowrank(folder, "give the model's Hugging Face folder")
    if found is not None:
        raise CheckpointError(
            f"{found[0]}: is a lowrank file (factors, not the model's weights); run lowrank expand {folder}"
            " and give the dense folder it writes"
        )


def checkpoint_keys(folder: Path) -> list[str]:
    """The tensor names of every safetensors file in `folder`."""
    from safetensors import safe_open

    keys = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys += list(handle.keys())
    return keys


def checkpoint_names(module_names: Iterable[str], keys: Iterable[str], prefix: str = "") -> dict[str, str]:
    """Module name -> the checkpoint's weight name: MODULE.weight, or with the model's base_model_prefix
    `prefix` added or removed (io.hfconfig.prefix_variants).

    A model saved with a task head prefixes the base model (`bert.encoder…`) while the loaded base
    model names it `encoder…`; and the other way round for a head model loading a bare checkpoint.
    """
    keys = set(keys)
    names = {}
    for module in module_names:
        found = next((name for name in prefix_variants(f"{module}.weight", prefix) if name in keys), None)
        if found is not None:
            names[module] = found
    return names


def check_samples(model: torch.nn.Module, tokenizer, samples: list[list[int]], folder: Path) -> None:
    """Refuse samples the model cannot read, and a tokenizer that is not the model's (mostly unknown tokens)."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max(len(ids) for ids in samples)
    if isinstance(positions, int) and longest > positions:
        raise UsageError(
            f"{arg('seq_len')} {longest}: {folder.name} reads at most {positions} tokens; lower {arg('seq_len')}"
        )
    vocabulary = getattr(config, "vocab_size", None)
    if isinstance(vocabulary, int) and len(tokenizer) < vocabulary / 10:  # a bare default tokenizer: a handful
        raise CheckpointError(
            f"{folder}: its tokenizer has {len(tokenizer):,} tokens, the model {vocabulary:,}; the tokenizer"
            " files (tokenizer.json, vocab.txt, …) are missing or of another model"
        )
    unknown = tokenizer.unk_token_id
    if unknown is not None:
        share = sum(ids.count(unknown) for ids in samples) / sum(len(ids) for ids in samples)
        if share > 0.5:
            raise CheckpointError(
                f"{folder}: its tokenizer reads {share:.0%} of the text as unknown tokens; the tokenizer files"
                " are missing or of another model, or the text is not in the model's language"
            )
