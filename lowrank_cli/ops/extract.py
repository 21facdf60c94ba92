"""`lowrank extract`: a LoRA adapter from the difference a fine-tune made, ΔW = W_tuned − W_base.

DIR becomes a PEFT LoRA adapter: adapter_model.safetensors with
    base_model.model.<module>.lora_A.weight  (r, in)    A = V_rᵀ
    base_model.model.<module>.lora_B.weight  (out, r)   B = U_r·diag(S_r)
and adapter_config.json with lora_alpha = r (and alpha_pattern = rank_pattern), so every
module's scaling alpha/r is exactly 1 and the merged weight is W_base + B·A.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_cli.linalg.budget import policy_per_tensor
from lowrank_cli.io.checkpoint import Checkpoint, TensorEntry, is_selected, natural_key
from lowrank_cli.ops.compress import Settings
from lowrank_cli.io.dtypes import FACTOR_DTYPES, compute_dtype, torch_dtype
from lowrank_cli.errors import OutputError, TensorError
from lowrank_cli.linalg.factorize import factorize, finite, generator_for, relative_error
from lowrank_cli.io.outputs import FolderOutput, check_output
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.ops.report import Report, TensorReport, Totals
from lowrank_cli.io.writer import SafetensorsWriter

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The module's own name, not its container's: embeddings.embed_proj is a Linear.
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|shared|\w*_embeddings?)$")


@dataclass(frozen=True)
class ExtractOptions:
    embeddings: bool = False  # LoRA on embeddings (lora_embedding_A/B)
    conv: bool = False  # LoRA on conv kernels (lora_A as a kh×kw conv, lora_B as 1×1)
    base_model: str | None = None  # base_model_name_or_path in adapter_config.json


def extract(
    base: Checkpoint,
    tuned: Checkpoint,
    policy: RankPolicy,
    out: Path,
    *,
    settings: Settings | None = None,
    options: ExtractOptions | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> Report:
    """Factor ΔW of every module weight both checkpoints share into a PEFT LoRA adapter in `out`."""
    settings = settings or Settings()
    options = options or ExtractOptions()
    check_output(base, out, force=True)  # an input first: never invite --force onto BASE
    out = check_output(tuned, out, force=force)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; an adapter is a folder, choose another -o")
    names = sorted(set(base.entries) | set(tuned.entries), key=natural_key)
    names = [name for name in names if is_selected(name, include, exclude)]
    tensors: dict[str, TensorReport] = {}
    candidates = []
    for name in names:
        report, reason = _screen(base, tuned, name, options)
        tensors[name] = report
        if reason is None:
            candidates.append(name)
        else:
            report.status, report.reason = "skipped", reason
    policy_for = policy_per_tensor(
        policy,
        candidates,
        lambda name: _delta(base, tuned, name, settings.device),
        on_done=(lambda name: on_tensor(tuned.entries[name])) if on_tensor else None,
    )
    adapter: dict[str, tuple[int, str]] = {}  # module -> (rank, kind)
    with FolderOutput(out) as folder:
        writer = SafetensorsWriter(folder.path / ADAPTER_WEIGHTS, {"format": "pt"})
        with writer:
            for name in candidates:
                report = tensors[name]
                delta = _delta(base, tuned, name, settings.device)
                if not bool(delta.any()):
                    report.status, report.reason = "skipped", "unchanged (ΔW = 0)"
                    continue
                result = factorize(
                    delta,
                    policy_for(name),
                    method=settings.method,
                    generator=generator_for(name, settings.seed, delta.device),
                )
                stored = torch_dtype(
                    tuned.entries[name].dtype if settings.dtype == "keep" else FACTOR_DTYPES[settings.dtype]
                )
                b, a, _ = result.factors(stored)
                if not (finite(b) and finite(a)):
                    raise TensorError(
                        f"{tuned.source}: tensor '{name}': its LoRA factors overflow {stored}; use --dtype float32"
                    )
                report.rank, report.method = result.rank, result.method
                report.rel_error = relative_error(delta, b, a)
                report.kept = max(0.0, 1.0 - report.rel_error**2)
                report.params_after = result.rank * sum(delta.shape)
                report.status = "extracted"
                module = name.removesuffix(".weight")
                kind = _write_lora(writer, module, tuned.entries[name], b.cpu(), a.cpu())
                adapter[module] = (result.rank, kind)
                if on_tensor:
                    on_tensor(tuned.entries[name])
            if not adapter:
                opt_in = [t.name for t in tensors.values() if "pass --" in (t.reason or "")]
                hint = f"; {opt_in[0]} is excluded by default ({tensors[opt_in[0]].reason})" if opt_in else ""
                raise TensorError(
                    f"{tuned.source}: no module weight differs from {base.source}; nothing to extract"
                    f" (check the order BASE TUNED and --include/--exclude){hint}"
                )
            size = writer.commit()
        config = adapter_config(adapter, options.base_model)
        (folder.path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        folder.commit()
    reports = list(tensors.values())
    for report in reports:
        if report.status == "skipped":
            report.params_after = 0  # not in the adapter
    extracted = [t for t in reports if t.status == "extracted"]
    totals = Totals.of(extracted, nbytes_after=size)
    return Report(
        command="extract",
        sources=[str(base.source), str(tuned.source)],
        tensors=reports,
        totals=totals,
        policy=policy.as_dict(),
        output=str(out),
        options={"dtype": settings.dtype, "method": settings.method, "seed": settings.seed},
    )


def adapter_config(adapter: dict[str, tuple[int, str]], base_model: str | None) -> dict:
    """PEFT's LoraConfig fields: r is the most common rank, the others go in rank_pattern."""
    ranks = Counter(rank for rank, _ in adapter.values())
    r = max(ranks, key=lambda rank: (ranks[rank], -rank))
    pattern = {module: rank for module, (rank, _) in adapter.items() if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1
        "target_modules": sorted(adapter, key=natural_key),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha = r per module: scaling stays 1
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _screen(base: Checkpoint, tuned: Checkpoint, name: str, options: ExtractOptions) -> tuple[TensorReport, str | None]:
    """The tensor's report row, and why it cannot go into the adapter (None if it can)."""
    entry = tuned.entries.get(name) or base.entries[name]
    report = TensorReport(
        name=name,
        shape=list(entry.shape),
        dtype=entry.dtype,
        params=entry.numel,
        status="skipped",
        file=str(entry.path),
    )
    if name not in tuned.entries:
        return report, "only in BASE"
    if name not in base.entries:
        return report, "only in TUNED"
    other = base.entries[name]
    if other.shape != entry.shape:
        return report, f"shape differs: BASE {'×'.join(map(str, other.shape))}, TUNED {'×'.join(map(str, entry.shape))}"
    if not (entry.is_float and other.is_float):
        return report, f"{entry.dtype}, not floating point"
    if len(entry.shape) < 2:
        changed = _change(base, tuned, name)
        if changed == 0:
            return report, f"{len(entry.shape)}-D, unchanged"
        return report, f"{len(entry.shape)}-D: changed by {changed:.3g} relative, which LoRA cannot carry"
    if entry.numel == 0:
        return report, "empty tensor"
    if not name.endswith(".weight"):
        return report, "not a module weight (name does not end in .weight)"
    if _EMBEDDING.search(name.removesuffix(".weight")) and len(entry.shape) == 2:
        return report, None if options.embeddings else "embedding (pass --embeddings to include)"
    if len(entry.shape) == 4:
        return report, None if options.conv else "conv kernel (pass --conv to include)"
    if len(entry.shape) != 2:
        return report, f"{len(entry.shape)}-D tensor, no LoRA layer for it"
    return report, None


def _change(base: Checkpoint, tuned: Checkpoint, name: str) -> float:
    before = base.read(name).to(torch.float64)
    after = tuned.read(name).to(torch.float64)
    norm = float(torch.linalg.vector_norm(before))
    diff = float(torch.linalg.vector_norm(after - before))
    return diff / norm if norm > 0 else diff


def _delta(base: Checkpoint, tuned: Checkpoint, name: str, device: str) -> torch.Tensor:
    """ΔW as an (out, in·kh·kw) matrix in float32 (float64 if either side is), checked for NaN/Inf."""
    entry = tuned.entries[name]
    dtype = compute_dtype("F64" if "F64" in (entry.dtype, base.entries[name].dtype) else entry.dtype)
    before = base.read(name).to(device=device, dtype=dtype)
    after = tuned.read(name).to(device=device, dtype=dtype)
    for checkpoint, value in ((base, before), (tuned, after)):
        if not bool(torch.isfinite(value).all()):
            raise TensorError(
                f"{checkpoint.entries[name].path}: tensor '{name}' contains NaN or Inf; repair it or --exclude '{name}'"
            )
    return (after - before).reshape(entry.matrix_shape)


def _write_lora(writer: SafetensorsWriter, module: str, entry: TensorEntry, b: torch.Tensor, a: torch.Tensor) -> str:
    """Write one module's factors under PEFT's key names; returns the LoRA layer kind."""
    prefix = f"base_model.model.{module}"
    if _EMBEDDING.search(module) and len(entry.shape) == 2:
        # PEFT's Embedding: ΔW (vocab, dim) = (lora_embedding_B @ lora_embedding_A)ᵀ
        writer.add_tensor(f"{prefix}.lora_embedding_A", b.T.contiguous())  # (r, vocab)
        writer.add_tensor(f"{prefix}.lora_embedding_B", a.T.contiguous())  # (dim, r)
        return "embedding"
    if len(entry.shape) == 4:
        out_channels, in_channels, kh, kw = entry.shape
        writer.add_tensor(f"{prefix}.lora_A.weight", a.reshape(a.shape[0], in_channels, kh, kw))  # (r, in, kh, kw)
        writer.add_tensor(f"{prefix}.lora_B.weight", b.reshape(out_channels, b.shape[1], 1, 1))  # (out, r, 1, 1)
        return "conv"
    writer.add_tensor(f"{prefix}.lora_A.weight", a)  # (r, in)
    writer.add_tensor(f"{prefix}.lora_B.weight", b)  # (out, r)
    return "linear"
