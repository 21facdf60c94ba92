"""The PEFT LoRA adapter format: adapter_model.safetensors and adapter_config.json.

    base_model.model.<module>.lora_A.weight  (r, in)    A = V_rᵀ
    base_model.model.<module>.lora_B.weight  (out, r)   B = U_r·diag(S_r)

with lora_alpha = r (and alpha_pattern = rank_pattern), so every module's scaling alpha/r is
exactly 1 and the merged weight is W_base + B·A. Beside the pairs, what LoRA's product cannot carry:

    base_model.model.<module>.lora_B.bias    (out,)     Δb, with lora_bias = true (PEFT adds it to the output)
    base_model.model.<module>.<param>                   the tuned tensors of a module in modules_to_save

PEFT puts modules_to_save's tensors back under `<module>.modules_to_save.<adapter>.` when it loads them.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from lowrank_cli.io.checkpoint import natural_key
from lowrank_cli.io.writer import SafetensorsWriter

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The module's own name, not its container's: embeddings.embed_proj is a Linear.
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|shared|\w*_embeddings?)$")


def is_embedding(module: str, shape: tuple[int, ...]) -> bool:
    """A 2-D weight whose module name is an embedding's: PEFT adapts it with lora_embedding_A/B."""
    return len(shape) == 2 and bool(_EMBEDDING.search(module))


def adapter_config(
    adapter: dict[str, tuple[int, str]],
    base_model: str | None,
    *,
    lora_bias: bool = False,
    modules_to_save: list[str] | None = None,
) -> dict:
    """PEFT's LoraConfig fields: r is the most common rank, the others go in rank_pattern."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        **rank_fields({module: (rank, rank) for module, (rank, _) in adapter.items()}),
        "target_modules": sorted(adapter, key=natural_key),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "lora_bias": lora_bias,
        "modules_to_save": sorted(modules_to_save, key=natural_key) if modules_to_save else None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def rank_fields(modules: dict[str, tuple[int, float]]) -> dict:
    """r, lora_alpha, rank_pattern and alpha_pattern for {module: (rank, alpha)}.

    r is the most common rank and lora_alpha = r; a module with another rank or alpha gets its own
    entry (alpha = rank: scaling alpha/r exactly 1), named in full as PEFT matches patterns by suffix.
    """
    ranks = Counter(rank for rank, _ in modules.values())
    r = max(ranks, key=lambda rank: (ranks[rank], -rank))
    ordered = sorted(modules.items(), key=lambda item: natural_key(item[0]))
    return {
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1
        "rank_pattern": {module: rank for module, (rank, _) in ordered if rank != r},
        "alpha_pattern": {module: alpha for module, (_, alpha) in ordered if alpha != r},
    }


def write_lora(writer: SafetensorsWriter, module: str, shape: tuple[int, ...], b: torch.Tensor, a: torch.Tensor) -> str:
    """Write one module's factors under PEFT's key names; returns the LoRA layer kind."""
    prefix = f"base_model.model.{module}"
    if is_embedding(module, shape):
        # PEFT's Embedding: ΔW (vocab, dim) = (lora_embedding_B @ lora_embedding_A)ᵀ
        writer.add_tensor(f"{prefix}.lora_embedding_A", b.T.contiguous())  # (r, vocab)
        writer.add_tensor(f"{prefix}.lora_embedding_B", a.T.contiguous())  # (dim, r)
        return "embedding"
    if len(shape) == 4:
        out_channels, in_channels, kh, kw = shape
        writer.add_tensor(f"{prefix}.lora_A.weight", a.reshape(a.shape[0], in_channels, kh, kw))  # (r, in, kh, kw)
        writer.add_tensor(f"{prefix}.lora_B.weight", b.reshape(out_channels, b.shape[1], 1, 1))  # (out, r, 1, 1)
        return "conv"
    writer.add_tensor(f"{prefix}.lora_A.weight", a)  # (r, in)
    writer.add_tensor(f"{prefix}.lora_B.weight", b)  # (out, r)
    return "linear"


def write_lora_bias(writer: SafetensorsWriter, module: str, delta: torch.Tensor) -> None:
    """A target's bias change Δb (out,): PEFT's lora_B carries it when the config says lora_bias."""
    writer.add_tensor(f"base_model.model.{module}.lora_B.bias", delta)


def write_saved(writer: SafetensorsWriter, name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> None:
    """One tensor of a module in modules_to_save, bit for bit as the tuned model stores it."""
    writer.add_bytes(f"base_model.model.{name}", dtype, shape, data)
