"""resize: a LoRA adapter (PEFT or kohya) at new ranks, each ΔW = scale·B·A truncated by a policy.

The product is never formed (linalg.product): the QR of B and of Aᵀ leaves an r×r core with the
singular values of ΔW, which goes through the same factor step as compress (ops.pipeline.factor);
its factors times the two Q are the new B′ (m, r′) and A′ (r′, n). The new pairs have scale 1
(PEFT: alpha = r′ in alpha_pattern; kohya: .alpha = r′), so B′·A′ is ΔW′ itself, and each row's
error ‖ΔW − ΔW′‖_F / ‖ΔW‖_F is measured on the factors as written, again from the factors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from lowrank_cli.errors import OutputError, TensorError, arg
from lowrank_cli.io.checkpoint import TensorEntry, is_selected
from lowrank_cli.io.lora import LoraAdapter, LoraPair
from lowrank_cli.io.outputs import FolderOutput, check_output
from lowrank_cli.io.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, rank_fields
from lowrank_cli.io.publish import sweep_stale_temps
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.linalg.factorize import finite
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.product import ProductCore, difference_norm, product_core
from lowrank_cli.ops.budget import budget_options, tensor_policies
from lowrank_cli.ops.pipeline import check_finite, factor, record, spectrum_of, stored_dtype
from lowrank_cli.ops.report import Report, Status, TensorReport, Totals
from lowrank_cli.ops.settings import Method, Settings


def resize(
    adapter: LoraAdapter,
    policy: RankPolicy,
    out: Path,
    *,
    settings: Settings | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> Report:
    """Write `adapter` with every selected pair truncated by `policy` into `out`, in the adapter's format.

    A pair not selected (include/exclude globs on module names) and every other tensor (PEFT's
    lora_B.bias, modules_to_save) are copied as they are.
    """
    settings = replace(settings or Settings(), method=Method.exact)  # the core is r×r: exact costs nothing
    out = check_output(adapter.checkpoint, Path(out), force=force)
    if adapter.format == "peft" and out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; a PEFT adapter is a folder, choose another output")
    if adapter.format == "kohya" and out.is_dir():
        raise OutputError(f"{out}: is a folder; a kohya LoRA is one .safetensors file, choose another output")
    selected = [pair for pair in adapter.pairs if is_selected(pair.module, include, exclude)]
    cores = {pair.module: _core(adapter, pair, settings.device) for pair in selected}
    policy_for = _policies(adapter, selected, cores, policy)
    notes = sweep_stale_temps(out.parent)
    rows, written = [], {}  # written: module -> (rank, alpha) as written
    with FolderOutput(out, force=force) if adapter.format == "peft" else _NoFolder(out) as folder:
        target = folder.path / ADAPTER_WEIGHTS if adapter.format == "peft" else out
        metadata = dict(adapter.checkpoint.metadata or {}) if adapter.format == "kohya" else {"format": "pt"}
        with SafetensorsWriter(target, metadata, display=out, force=force and adapter.format == "kohya") as writer:
            for pair in adapter.pairs:
                if pair.module in cores:
                    row, rank = _resize_one(
                        adapter, pair, cores[pair.module], policy_for(pair.module), settings, writer
                    )
                    written[pair.module] = (rank, float(rank))
                else:
                    row = _copy_pair(adapter, pair, writer)
                    written[pair.module] = (pair.rank, pair.scale * pair.rank)
                rows.append(row)
                if on_tensor:
                    on_tensor(adapter.checkpoint.entries[pair.up])
            for name in adapter.others:
                entry = adapter.checkpoint.entries[name]
                writer.add_bytes(name, entry.dtype, entry.shape, adapter.checkpoint.read_bytes(name))
            if adapter.format == "kohya":
                writer.metadata = _kohya_metadata(adapter.checkpoint.metadata, written)
            size = writer.commit()
        if adapter.format == "peft":
            config = {**adapter.config, **rank_fields(written), "use_rslora": False}
            (folder.path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            folder.commit()
    report = Report(
        command="resize",
        sources=[str(adapter.source)],
        tensors=rows,
        totals=Totals.of(rows, adapter.checkpoint.nbytes, size),
        policy=policy.as_dict(),
        output=str(out),
        options={**settings.as_dict(), "format": adapter.format, **budget_options(policy, None, adapter=True)},
    )
    if notes:
        report.options["notes"] = notes
    return report


class _NoFolder:
    """A kohya output is one file, which its writer publishes itself."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent

    def __enter__(self) -> _NoFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _core(adapter: LoraAdapter, pair: LoraPair, device: str) -> ProductCore:
    up, down = adapter.factors(pair, device)  # (m, r), (r, n)
    for key, value in ((pair.up, up), (pair.down, down)):
        check_finite(value, f"{adapter.source}: tensor '{key}'", pair.module)
    return product_core(up, down, pair.scale)


def _policies(
    adapter: LoraAdapter, pairs: list[LoraPair], cores: dict[str, ProductCore], policy: RankPolicy
) -> Callable[[str], RankPolicy]:
    """One policy for all, or under a budget a rank each (ops.budget, an adapter's as extract's).

    The core's singular values are ΔW's; the budget counts r′·(m + n) against F·Σ m·n of the ΔWs.
    """
    if policy.budget is None:
        return lambda module: policy
    spectra = {pair.module: _spectrum(adapter, pair, cores[pair.module]) for pair in pairs}
    return tensor_policies(policy, spectra, adapter=True)


def _spectrum(adapter: LoraAdapter, pair: LoraPair, core: ProductCore):
    m, *rest = adapter.delta_shape(pair)
    return replace(spectrum_of(core.core), shape=(m, int(torch.tensor(rest).prod())))


def _resize_one(
    adapter: LoraAdapter,
    pair: LoraPair,
    core: ProductCore,
    policy: RankPolicy,
    settings: Settings,
    writer: SafetensorsWriter,
) -> tuple[TensorReport, int]:
    """Truncate one pair and write it; returns its row and the rank written."""
    row = _row(adapter, pair)
    norm = float(torch.linalg.matrix_norm(core.core))
    if norm == 0.0:  # B or A is zero (an untrained PEFT LoRA): nothing to truncate, written as it is
        _copy_pair(adapter, pair, writer, row)
        row.reason = "ΔW = 0: written as it is"
        return row, pair.rank
    stored = stored_dtype(settings, adapter.checkpoint.entries[pair.up].dtype)
    up, down = adapter.factors(pair, settings.device)
    full = min(core.core.shape)
    outcome, b, a, error = _truncate(core, policy, settings, pair, stored, up, down, norm)
    target = policy.max_error
    while target is not None and error > target and outcome.decision.rank < full:  # rounding to `stored` added error
        outcome, b, a, error = _truncate(
            core, RankPolicy(rank=outcome.decision.rank + 1), settings, pair, stored, up, down, norm
        )
    if target is not None and error > target:
        raise TensorError(
            f"{adapter.source}: '{pair.module}' stored in {str(stored).removeprefix('torch.')} misses"
            f" {arg('max_error')} {target:g} even at its full rank {full} ({error:.3g}); use {arg('dtype')} float32"
        )
    if outcome.spectrum is not None:
        outcome.spectrum = _spectrum(adapter, pair, core)
    record(row, outcome)
    rank = outcome.decision.rank
    row.status, row.rank, row.rel_error = Status.resized, rank, error
    row.kept = max(0.0, 1.0 - error**2)
    row.params_after = b.numel() + a.numel()
    up_shape, down_shape = (adapter.checkpoint.entries[key].shape for key in (pair.up, pair.down))
    writer.add_tensor(pair.up, b.reshape(up_shape[0], rank, *up_shape[2:]))  # (out, r′[, 1…])
    writer.add_tensor(pair.down, a.reshape(rank, *down_shape[1:]))  # (r′, in[, k…])
    if pair.alpha is not None:
        writer.add_tensor(pair.alpha, torch.tensor(float(rank), dtype=torch.float32))  # scale alpha/r′ = 1
    return row, rank


def _truncate(core, policy, settings, pair, stored, up, down, norm):
    """The core's factors by `policy` as factors of ΔW in the stored dtype, and their error measured on those."""
    outcome = factor(core.core, policy, settings, name=pair.module, stored=torch.float64, limit=min(core.core.shape))
    b, a = core.expand(outcome.b, outcome.a)  # (m, r′), (r′, n)
    b, a = b.to(stored), a.to(stored)
    if not (finite(b) and finite(a)):
        raise TensorError(f"'{pair.module}': its resized factors overflow {stored}; use {arg('dtype')} float32")
    return outcome, b, a, difference_norm(pair.scale * up, down, b, a) / norm


def _copy_pair(adapter: LoraAdapter, pair: LoraPair, writer: SafetensorsWriter, row: TensorReport | None = None):
    """A pair left as it is: its tensors bit for bit."""
    for key in (pair.up, pair.down, pair.alpha):
        if key is not None and key in adapter.checkpoint.entries:
            entry = adapter.checkpoint.entries[key]
            writer.add_bytes(key, entry.dtype, entry.shape, adapter.checkpoint.read_bytes(key))
    row = row or _row(adapter, pair)
    row.status, row.rank, row.reason = Status.copied, pair.rank, row.reason or "not selected (include/exclude)"
    row.params_after = row.params
    return row


def _row(adapter: LoraAdapter, pair: LoraPair) -> TensorReport:
    entries = adapter.checkpoint.entries
    return TensorReport(
        name=pair.module,
        shape=list(adapter.delta_shape(pair)),
        dtype=entries[pair.up].dtype,
        params=entries[pair.up].numel + entries[pair.down].numel,
        status=Status.skipped,
        rank_before=pair.rank,
        file=str(entries[pair.up].path),
    )


def _kohya_metadata(metadata: dict[str, str] | None, written: dict[str, tuple[int, float]]) -> dict[str, str] | None:
    """sd-scripts' ss_network_dim/alpha, where the input had them: the rank if all share one, else "Dynamic"."""
    if metadata is None:
        return None
    ranks = {rank for rank, _ in written.values()}
    alphas = {alpha for _, alpha in written.values()}
    updated = dict(metadata)
    if "ss_network_dim" in updated:
        updated["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    if "ss_network_alpha" in updated:
        updated["ss_network_alpha"] = f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"
    return updated
