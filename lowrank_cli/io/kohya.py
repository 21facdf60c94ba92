"""The kohya LoRA format (sd-scripts): one .safetensors file, read by diffusers' load_lora_weights and ComfyUI.

    <prefix>.lora_down.weight  (r, in[, kh, kw])   A
    <prefix>.lora_up.weight    (out, r[, 1, 1])    B
    <prefix>.alpha             ()                  ΔW = alpha / r · B·A (no .alpha: alpha = r)

<prefix> is sd-scripts' lora_name (networks/lora.py): the model's name and the module's path in
that model joined by '.', then every '.' written '_':

    lora_unet_<path>   the UNet (and any model that is not a text encoder)
    lora_te_<path>     the text encoder; lora_te1_ beside a second one (SDXL), which is lora_te2_

diffusers puts the dots back by its own rules for diffusers' module names
(loaders/lora_conversion_utils.py, _convert_non_diffusers_lora_to_diffusers). lowrank records the
names it wrote in the file's metadata (`lowrank_modules`, JSON {prefix: module}), so that resize can
write the file back as a PEFT adapter without guessing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lowrank_cli.errors import OutputError, arg
from lowrank_cli.io.writer import SafetensorsWriter

KOHYA_UP, KOHYA_DOWN, KOHYA_ALPHA = ".lora_up.weight", ".lora_down.weight", ".alpha"
MODULES_KEY = "lowrank_modules"  # metadata: JSON {prefix: the module's name in its model}
# The folders of a diffusers pipeline that kohya adapts, and the model name of each.
PIPELINE_MODELS = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
MODEL_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")


@dataclass(frozen=True)
class KohyaName:
    prefix: str  # lora_unet_down_blocks_0_attentions_0_proj_in
    module: str  # the module's name in its model: down_blocks.0.attentions.0.proj_in


def kohya_names(modules: Iterable[str], *, pipeline: Sequence[str] = ()) -> dict[str, KohyaName]:
    """{module: its kohya name}.

    Args:
        modules: module names (tensor names without `.weight`).
        pipeline: the folders read from a diffusers pipeline (unet, text_encoder, text_encoder_2);
            then each module's name begins with its folder's. Without, a module is the UNet's unless
            its name begins `text_model.` (a CLIP text encoder's).

    Example:
        >>> kohya_names(["text_model.encoder.layers.0.mlp.fc1"])
        {'text_model.encoder.layers.0.mlp.fc1': KohyaName(prefix='lora_te_text_model_encoder_layers_0_mlp_fc1', …)}
    """
    names = {}
    for module in modules:
        if pipeline:
            folder, _, inner = module.partition(".")
            model = PIPELINE_MODELS[folder]
            if folder == "text_encoder" and "text_encoder_2" in pipeline:
                model = "lora_te1"  # sd-scripts' SDXL names
        else:
            inner, model = module, "lora_te" if module.startswith("text_model.") else "lora_unet"
        names[module] = KohyaName(f"{model}_{inner.replace('.', '_')}", inner)
    taken: dict[str, str] = {}
    for module, name in names.items():
        other = taken.setdefault(name.prefix, module)
        if other != module:
            raise OutputError(
                f"'{other}' and '{module}' would both be kohya's '{name.prefix}' (a '.' and a '_' read alike);"
                f" leave one out with {arg('exclude')} or write {arg('format')} peft"
            )
    return names


def model_of(prefix: str) -> str:
    """The model a kohya prefix belongs to: lora_unet, lora_te, lora_te1, lora_te2, or the text before its first _."""
    return next((m for m in MODEL_PREFIXES if prefix.startswith(m + "_")), prefix.partition("_")[0])


def write_kohya_pair(
    writer: SafetensorsWriter, prefix: str, shape: tuple[int, ...], b: torch.Tensor, a: torch.Tensor
) -> None:
    """One module's ΔW ≈ B·A (shape `shape`) under kohya's keys, at scale 1: .alpha = r."""
    rank = b.shape[1]
    writer.add_tensor(prefix + KOHYA_DOWN, a.reshape(rank, *shape[1:]))  # (r, in[, kh, kw])
    writer.add_tensor(prefix + KOHYA_UP, b.reshape(shape[0], rank, *[1] * (len(shape) - 2)))  # (out, r[, 1, 1])
    write_alpha(writer, prefix + KOHYA_ALPHA, float(rank))


def write_alpha(writer: SafetensorsWriter, key: str, alpha: float) -> None:
    """A kohya .alpha under `key` (PREFIX.alpha): a float32 scalar, as sd-scripts writes it; ΔW = alpha / r · B·A."""
    writer.add_tensor(key, torch.tensor(alpha, dtype=torch.float32))


def kohya_metadata(written: dict[str, tuple[int, float]], modules: dict[str, str] | None) -> dict[str, str]:
    """sd-scripts' ss_network_* fields for {prefix: (rank, alpha)}, and the module names lowrank wrote."""
    metadata = {"ss_network_module": "networks.lora", **network_fields(written)}
    if modules:
        metadata[MODULES_KEY] = json.dumps(modules, separators=(",", ":"))
    return metadata


def network_fields(written: dict[str, tuple[int, float]]) -> dict[str, str]:
    """ss_network_dim and ss_network_alpha: the rank (alpha) if all modules share one, else "Dynamic"."""
    ranks = {rank for rank, _ in written.values()}
    alphas = {alpha for _, alpha in written.values()}
    return {
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{next(iter(alphas)):g}" if len(alphas) == 1 else "Dynamic",
    }


def recorded_modules(metadata: dict[str, str] | None) -> dict[str, str] | None:
    """{prefix: module} as lowrank recorded them, or None for a file that does not say."""
    try:
        modules = json.loads((metadata or {})[MODULES_KEY])
    except (KeyError, ValueError):
        return None
    if not isinstance(modules, dict) or not all(isinstance(v, str) for v in modules.values()):
        return None
    return modules
