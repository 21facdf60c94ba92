"""resize: a LoRA adapter (PEFT or kohya) at new ranks, each ΔW = scale·B·A truncated by a policy.

The product is never formed (linalg.product): the QR of B and of Aᵀ leaves an r×r core with the
singular values of ΔW, which goes through the same factor step as compress (ops.factoring.factor_matrix);
its factors times the two Q are the new B′ (m, r′) and A′ (r′, n). The new pairs have scale 1
(PEFT: alpha = r′ in alpha_pattern; kohya: .alpha = r′), so B′·A′ is ΔW′ itself, and each row's
error ‖ΔW − ΔW′‖_F / ‖ΔW‖_F is measured on the factors as written, again from the factors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, OutputError, TensorError, arg
from lowrank_cli.io.checkpoint import TensorEntry, is_selected
from lowrank_cli.io.kohya import (
    KOHYA_ALPHA,
    KOHYA_DOWN,
    KOHYA_UP,
    MODULES_KEY,
    kohya_metadata,
    kohya_names,
    model_of,
    network_fields,
    recorded_modules,
    write_alpha,
)
from lowrank_cli.io.lora import PEFT_PREFIX, LoraAdapter, LoraPair
from lowrank_cli.io.outputs import FolderOutput, check_output
from lowrank_cli.io.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, rank_fields
from lowrank_cli.io.publish import sweep_stale_temps
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.linalg.factorize import finite
from lowrank_cli.linalg.policy import RankPolicy, require_policy
from lowrank_cli.linalg.product import ProductCore, difference_norm, product_core
from lowrank_cli.ops.budget import budget_options, tensor_policies
from lowrank_cli.ops.factoring import check_finite, factor_matrix, record, spectrum_of, stored_dtype
from lowrank_cli.ops.report import Report, Status, TensorReport, Totals
from lowrank_cli.ops.settings import AdapterFormat, Method, Settings, choice

# Hashes of the file's tensors that sd-scripts records (train_util.precalculate_safetensors_hashes: sha256
# of the data sd-webui-additional-networks reads; the SAI model spec's): the input's are false of the output.
_CONTENT_HASHES = frozenset({"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"})


def resize(
    adapter: LoraAdapter,
    policy: RankPolicy | None,
    out: Path,
    *,
    format: AdapterFormat | str | None = None,
    settings: Settings | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> Report:
    """Write `adapter` with every selected pair truncated by `policy` into `out`, as `format` (default: its own).

    A pair not selected (include/exclude globs on module names) and every other tensor (PEFT's
    lora_B.bias, modules_to_save) are copied as they are; so is every pair when `policy` is None,
    which only converts between PEFT and kohya (io.kohya: names, alpha = scale·r).
    """
    settings = replace(settings or Settings(), method=Method.exact)  # the core is r×r: exact costs nothing
    target = choice(AdapterFormat, format or adapter.format, "format")
    if target == adapter.format:
        require_policy(policy)
    out = check_output(adapter.checkpoint, Path(out), force=force)
    if target == AdapterFormat.peft and out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; a PEFT adapter is a folder, choose another output")
    if target == AdapterFormat.kohya and out.is_dir():
        raise OutputError(f"{out}: is a folder; a kohya LoRA is one .safetensors file, choose another output")
    keys = _output_keys(adapter, target)
    selected = [pair for pair in adapter.pairs if policy and is_selected(pair.module, include, exclude)]
    cores = {pair.module: _core(adapter, pair, settings.device) for pair in selected}
    policy_for = _policies(adapter, selected, cores, policy)
    notes = sweep_stale_temps(out.parent)
    rows, written = [], {}  # written: output module name -> (rank, alpha) as written
    peft = target == AdapterFormat.peft
    with FolderOutput(out, force=force) if peft else _NoFolder(out) as folder:
        path = folder.path / ADAPTER_WEIGHTS if peft else out
        with SafetensorsWriter(path, {"format": "pt"}, display=out, force=force and not peft) as writer:
            for pair in adapter.pairs:
                if pair.module in cores:
                    row, written[keys[pair.module].name] = _resize_one(
                        adapter, pair, keys[pair.module], cores[pair.module], policy_for(pair.module), settings, writer
                    )
                else:
                    why = "not selected (include/exclude)" if policy else f"converted to {target.value} as it is"
                    row = _copy_pair(adapter, pair, keys[pair.module], writer, why)
                    written[keys[pair.module].name] = (pair.rank, pair.scale * pair.rank)
                rows.append(row)
                if on_tensor:
                    on_tensor(adapter.checkpoint.entries[pair.up])
            for name in adapter.others:
                entry = adapter.checkpoint.entries[name]
                writer.add_bytes(name, entry.dtype, entry.shape, adapter.checkpoint.read_bytes(name))
            if not peft:
                writer.metadata = _kohya_metadata(adapter, keys, written)
            size = writer.commit()
        if peft:
            config = _peft_config(adapter, written)
            (folder.path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            folder.commit()
    report = Report(
        command="resize",
        sources=[str(adapter.source)],
        tensors=rows,
        totals=Totals.of(rows, adapter.checkpoint.nbytes, size),
        policy=policy.as_dict() if policy else {},
        output=str(out),
        options={
            **settings.as_dict(),
            "format": target.value,
            "from": adapter.format,
            **budget_options(policy, None, adapter=True),
        },  # fmt: skip
    )
    if notes:
        report.options["notes"] = notes
    return report


@dataclass(frozen=True)
class _Keys:
    """Where a pair goes in the output: its name there and the keys of B, A and (kohya) alpha."""

    name: str  # PEFT: the module; kohya: the prefix
    up: str
    down: str
    alpha: str | None


def _output_keys(adapter: LoraAdapter, target: AdapterFormat) -> dict[str, _Keys]:
    """{pair.module: its keys in the output}; a conversion refuses what the other format cannot hold."""
    if target == adapter.format:
        return {p.module: _Keys(p.module, p.up, p.down, p.alpha) for p in adapter.pairs}
    if adapter.others:
        raise CheckpointError(
            f"{adapter.source}: '{adapter.others[0]}' is no LoRA pair, and a {target.value} adapter has no place"
            f" for it; resize it as {adapter.format} (leave out {arg('format')})"
        )
    if target == AdapterFormat.kohya:  # PEFT → kohya: sd-scripts' names
        embedding = next((p for p in adapter.pairs if p.is_embedding), None)
        if embedding is not None:
            raise CheckpointError(
                f"{adapter.source}: '{embedding.module}' is an embedding LoRA, which a kohya file cannot hold;"
                f" leave out {arg('format')} or resize the others with {arg('exclude')} '{embedding.module}'"
            )
        names = kohya_names(p.module for p in adapter.pairs)
        return {
            p.module: _Keys(prefix, prefix + KOHYA_UP, prefix + KOHYA_DOWN, prefix + KOHYA_ALPHA)
            for p in adapter.pairs
            for prefix in [names[p.module].prefix]
        }
    modules = _recorded_modules(adapter)  # kohya → PEFT: the names lowrank recorded
    return {
        p.module: _Keys(modules[p.module], *(f"{PEFT_PREFIX}{modules[p.module]}.lora_{x}.weight" for x in "BA"), None)
        for p in adapter.pairs
    }


def _recorded_modules(adapter: LoraAdapter) -> dict[str, str]:
    """{kohya prefix: module} from the file's metadata; refused when it has none, or pairs of several models."""
    models = sorted({model_of(pair.module) for pair in adapter.pairs})
    if len(models) > 1:
        raise CheckpointError(
            f"{adapter.source}: holds pairs of {len(models)} models ({', '.join(m + '_' for m in models)}),"
            f" and a PEFT adapter is for one; keep the kohya format (leave out {arg('format')})"
        )
    recorded = recorded_modules(adapter.checkpoint.metadata) or {}
    missing = next((pair.module for pair in adapter.pairs if pair.module not in recorded), None)
    if missing is not None:
        raise CheckpointError(
            f"{adapter.source}: '{missing}' does not say which of its '_' were '.' in the module's name (kohya"
            f" writes both as '_'), and only files lowrank wrote record it ({MODULES_KEY}); keep the kohya format"
        )
    return recorded


def _peft_config(adapter: LoraAdapter, written: dict[str, tuple[int, float]]) -> dict:
    """The input's adapter_config.json with the ranks written, or (from kohya) a new one; every alpha as written."""
    if adapter.config is not None:
        config = dict(adapter.config)
    else:
        config = adapter_config({module: (rank, "") for module, (rank, _) in written.items()}, None)
    return {**config, **rank_fields(written), "use_rslora": False}


def _kohya_metadata(
    adapter: LoraAdapter, keys: dict[str, _Keys], written: dict[str, tuple[int, float]]
) -> dict[str, str] | None:
    """kohya → kohya: the input's metadata, with sd-scripts' ss_network_dim/alpha updated where it had them,
    less the hashes of the input's tensors. PEFT → kohya: sd-scripts' fields and the module names (io.kohya)."""
    if adapter.format == AdapterFormat.peft:
        return kohya_metadata(written, {keys[p.module].name: p.module for p in adapter.pairs})
    metadata = adapter.checkpoint.metadata
    if metadata is None:
        return None
    fields = network_fields(written)
    kept = {key: value for key, value in metadata.items() if key not in _CONTENT_HASHES}
    return {**kept, **{key: value for key, value in fields.items() if key in metadata}}


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
    adapter: LoraAdapter, pairs: list[LoraPair], cores: dict[str, ProductCore], policy: RankPolicy | None
) -> Callable[[str], RankPolicy | None]:
    """One policy for all, or under a budget a rank each (ops.budget, an adapter's as extract's).

    The core's singular values are ΔW's; the budget counts r′·(m + n) against F·Σ m·n of the ΔWs.
    """
    if policy is None or policy.budget is None:
        return lambda module: policy
    spectra = {pair.module: _spectrum(adapter, pair, cores[pair.module]) for pair in pairs}
    return tensor_policies(policy, spectra, adapter=True)


def _spectrum(adapter: LoraAdapter, pair: LoraPair, core: ProductCore):
    m, *rest = adapter.delta_shape(pair)
    return replace(spectrum_of(core.core), shape=(m, int(torch.tensor(rest).prod())))


def _resize_one(
    adapter: LoraAdapter,
    pair: LoraPair,
    keys: _Keys,
    core: ProductCore,
    policy: RankPolicy,
    settings: Settings,
    writer: SafetensorsWriter,
) -> tuple[TensorReport, tuple[int, float]]:
    """Truncate one pair and write it; returns its row and the (rank, alpha) written."""
    row = _row(adapter, pair)
    norm = float(torch.linalg.matrix_norm(core.core))
    if norm == 0.0:  # B or A is zero (an untrained PEFT LoRA), or alpha is: nothing to truncate
        _copy_pair(adapter, pair, keys, writer, "ΔW = 0: written as it is", row)
        return row, (pair.rank, pair.scale * pair.rank)  # its own scale, 0 when alpha is
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
        raise TensorError(_missed(adapter, pair, core, settings, stored, up, down, norm, target, error))
    if outcome.spectrum is not None:
        outcome.spectrum = _spectrum(adapter, pair, core)
    record(row, outcome)
    rank = outcome.decision.rank
    row.status, row.rank, row.rel_error = Status.resized, rank, error
    row.kept = max(0.0, 1.0 - error**2)
    row.params_after = b.numel() + a.numel()
    up_shape, down_shape = (adapter.checkpoint.entries[key].shape for key in (pair.up, pair.down))
    writer.add_tensor(keys.up, b.reshape(up_shape[0], rank, *up_shape[2:]))  # (out, r′[, 1…])
    writer.add_tensor(keys.down, a.reshape(rank, *down_shape[1:]))  # (r′, in[, k…])
    if keys.alpha is not None:
        write_alpha(writer, keys.alpha, float(rank))  # scale alpha/r′ = 1
    return row, (rank, float(rank))


def _truncate(core, policy, settings, pair, stored, up, down, norm):
    """The core's factors by `policy` as factors of ΔW in the stored dtype, and their error measured on those.

    Where no rank meets the policy's error target even in float64, the full rank's (the caller refuses it).
    """
    full = min(core.core.shape)
    outcome = factor_matrix(core.core, policy, settings, name=pair.module, stored=torch.float64, limit=full)
    if outcome.b is None:
        outcome = factor_matrix(
            core.core, RankPolicy(rank=full), settings, name=pair.module, stored=torch.float64, limit=full
        )
    b, a = core.expand(outcome.b, outcome.a)  # (m, r′), (r′, n)
    b, a = b.to(stored), a.to(stored)
    if not (finite(b) and finite(a)):
        wider = "float32" if stored.itemsize < 4 else "float64"
        raise TensorError(f"'{pair.module}': its resized factors overflow {stored}; use {arg('dtype')} {wider}")
    return outcome, b, a, difference_norm(pair.scale * up, down, b, a) / norm


def _missed(adapter, pair, core, settings, stored, up, down, norm, target, error) -> str:
    """The refusal of a pair whose full rank misses max_error as stored, with a fix measured here: the
    narrowest wider dtype whose factors meet it, else the bounds the full rank meets."""
    full = min(core.core.shape)
    missed = (
        f"{adapter.source}: '{pair.module}' stored in {str(stored).removeprefix('torch.')} misses"
        f" {arg('max_error')} {target:g} even at its full rank {full} ({error:.3g})"
    )
    wider = [dtype for dtype in (torch.float32, torch.float64) if dtype.itemsize > stored.itemsize]
    for dtype in wider:
        *_, met = _truncate(core, RankPolicy(rank=full), settings, pair, dtype, up, down, norm)
        if met <= target:
            return f"{missed}; use {arg('dtype')} {str(dtype).removeprefix('torch.')}"
    if stored == torch.float64:
        return f"{missed}; it needs {arg('max_error')} {_rounded_up(error)} or more"
    return (
        f"{missed}; it needs {arg('max_error')} {_rounded_up(error)} or more"
        f" ({_rounded_up(met)} with {arg('dtype')} float64)"
    )


def _rounded_up(value: float) -> str:
    """A positive `value` to two significant digits, rounded up: a bound that `value` meets."""
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return f"{math.ceil(value / step) * step:.2g}"


def _copy_pair(
    adapter: LoraAdapter,
    pair: LoraPair,
    keys: _Keys,
    writer: SafetensorsWriter,
    reason: str,
    row: TensorReport | None = None,
) -> TensorReport:
    """A pair left as it is: B and A bit for bit under their keys in the output, and the same scale."""
    for key, out_key in ((pair.up, keys.up), (pair.down, keys.down)):
        entry = adapter.checkpoint.entries[key]
        writer.add_bytes(out_key, entry.dtype, entry.shape, adapter.checkpoint.read_bytes(key))
    if keys.alpha is not None and keys.alpha == pair.alpha:
        if pair.alpha in adapter.checkpoint.entries:  # kohya → kohya: as it was (none: alpha = r)
            entry = adapter.checkpoint.entries[pair.alpha]
            writer.add_bytes(keys.alpha, entry.dtype, entry.shape, adapter.checkpoint.read_bytes(pair.alpha))
    elif keys.alpha is not None:  # PEFT → kohya: scale = alpha / r
        write_alpha(writer, keys.alpha, pair.scale * pair.rank)
    row = row or _row(adapter, pair)
    row.status, row.rank, row.reason = Status.copied, pair.rank, reason
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
