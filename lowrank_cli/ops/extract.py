"""extract: a LoRA adapter from the difference a fine-tune made, ΔW = W_tuned − W_base.

OUT becomes a PEFT LoRA adapter folder (io.peft) or a kohya file (io.kohya): each module's ΔW goes
through the same factor step as compress (ops.factoring.factor_tensor), at any rank up to min(m, n). What
changed beside the matrices goes into a PEFT adapter too, unless `lora_only`: the bias change of an
adapted module as its lora_B.bias (lora_bias), and a module of 1-D tensors (a LayerNorm) whole, as
tuned, through modules_to_save. A kohya file holds LoRA pairs only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_cli.errors import OutputError, TensorError, UsageError, arg
from lowrank_cli.io.calibration import Calibration
from lowrank_cli.io.checkpoint import Checkpoint, PipelineCheckpoint, TensorEntry, is_selected, natural_key
from lowrank_cli.io.dtypes import compute_dtype
from lowrank_cli.io.kohya import KohyaName, kohya_metadata, kohya_names, write_kohya_pair
from lowrank_cli.io.outputs import FolderOutput, check_output
from lowrank_cli.io.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    is_embedding,
    write_lora,
    write_lora_bias,
    write_saved,
)
from lowrank_cli.io.publish import sweep_stale_temps
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.ops.budget import budget_options, policy_per_tensor
from lowrank_cli.ops.factoring import check_finite, factor_tensor, record, stored_dtype, whitened_view
from lowrank_cli.ops.report import Report, Status, TensorReport, Totals
from lowrank_cli.ops.settings import AdapterFormat, Settings, choice

UNCHANGED = "unchanged (ΔW = 0)"


@dataclass(frozen=True)
class ExtractOptions:
    embeddings: bool = False  # LoRA on embeddings (lora_embedding_A/B)
    conv: bool = False  # LoRA on conv kernels (lora_A as a kh×kw conv, lora_B as 1×1)
    base_model: str | None = None  # base_model_name_or_path in adapter_config.json; None: BASE's folder
    lora_only: bool = False  # only the LoRA pairs: leave changed biases and norms out
    format: AdapterFormat = AdapterFormat.peft  # a PEFT folder or a kohya file

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", choice(AdapterFormat, self.format, "format"))


@dataclass(frozen=True)
class Screened:
    """Why a tensor stays out of the adapter; `opt_in` names the argument that would let it in."""

    reason: str | None = None
    opt_in: str | None = None
    carry: bool = False  # a changed tensor of fewer than 2 dims: a candidate for lora_bias or modules_to_save


@dataclass(frozen=True)
class _Extras:
    """What goes into the adapter beside the LoRA pairs."""

    biases: list[str]  # every target's bias, written as its change lora_B.bias (lora_bias)
    modules: list[str]  # modules written whole, as tuned (modules_to_save)


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
    calibration: Calibration | None = None,
) -> Report:
    """Factor ΔW of every module weight both checkpoints share into a LoRA adapter in `out`.

    A PEFT adapter folder, or with options.format kohya one .safetensors file in kohya's key format
    (io.kohya), whose names come from a diffusers pipeline's model folders when BASE and TUNED are
    PipelineCheckpoints. With calibration (the base model's statistics), ΔW·S is factorized: the
    adapter minimizes the error in the layer's output change, ‖(ΔW − BA)X‖_F / ‖ΔW·X‖_F.
    """
    settings = settings or Settings()
    options = options or ExtractOptions()
    kohya = options.format == AdapterFormat.kohya
    check_adapter_policy(policy)
    _check_format(base, tuned, options)
    check_output(base, out, force=True)  # an input first: never invite force onto BASE
    out = check_output(tuned, out, force=force, inputs=[calibration.source if calibration is not None else None])
    if out.exists() and kohya == out.is_dir():
        kind = "a kohya LoRA is one .safetensors file" if kohya else "an adapter is a folder"
        raise OutputError(f"{out}: is a {'folder' if kohya else 'file'}; {kind}, choose another output")
    names = [
        n for n in sorted(set(base.entries) | set(tuned.entries), key=natural_key) if is_selected(n, include, exclude)
    ]
    tensors = {name: _row(base, tuned, name) for name in names}
    screened = {name: screen(base, tuned, name, options) for name in names}
    candidates = [name for name in names if screened[name].reason is None]
    for name in names:
        if screened[name].reason is not None:
            tensors[name].reason = screened[name].reason
    # kohya's names first: two modules that would share one stop the run before any work
    kohya_of = kohya_names([n.removesuffix(".weight") for n in candidates], pipeline=_models(tuned)) if kohya else {}
    policy_for = policy_per_tensor(
        policy,
        candidates,
        lambda name: whitened_view(delta_matrix(base, tuned, name, settings.device), calibration, name),
        on_done=(lambda name: on_tensor(tuned.entries[name])) if on_tensor else None,
        calibration=calibration,
        adapter=True,  # ranks only (a whole matrix goes in only via modules_to_save), ΔW's own objective
    )
    notes = sweep_stale_temps(out.parent)

    def write_pairs(writer: SafetensorsWriter, write_pair: _WritePair) -> dict[str, tuple[int, str]]:
        adapter = {}  # module -> (rank, kind)
        for name in candidates:
            step = (tensors[name], writer, write_pair, policy_for(name), settings, calibration)
            adapter.update(_extract_one(base, tuned, name, *step))
            if on_tensor:
                on_tensor(tuned.entries[name])
        if not adapter:
            raise TensorError(_nothing_changed(base, tuned, screened, tensors))
        return adapter

    if kohya:
        size = _write_kohya(base, tuned, out, tensors, screened, write_pairs, kohya_of, options, force)
    else:
        size = _write_peft(base, tuned, out, tensors, screened, write_pairs, options, settings, force)
    report = _report(base, tuned, list(tensors.values()), policy, out, settings, size)
    report.options["format"] = options.format.value
    report.options.update(budget_options(policy, calibration, adapter=True))
    totals = report.totals
    if totals.params and totals.params_after >= totals.params / 2:
        notes.append(
            "the adapter is half the size of the tensors it adapts or more, so it saves little; a lower rank"
            " or energy, or a higher max error, makes it smaller (docs/extract.md)"
        )
    if notes:
        report.options["notes"] = notes
    return report


# (writer, module, shape of ΔW, B (out, r), A (r, in·k…)) -> the LoRA layer kind
_WritePair = Callable[[SafetensorsWriter, str, tuple[int, ...], torch.Tensor, torch.Tensor], str]


def _write_peft(base, tuned, out, tensors, screened, write_pairs, options, settings, force) -> int:
    """The PEFT adapter folder: the pairs, what else changed (unless lora_only), adapter_config.json."""
    with FolderOutput(out, force=force) as folder:
        writer = SafetensorsWriter(folder.path / ADAPTER_WEIGHTS, {"format": "pt"})
        with writer:
            adapter = write_pairs(writer, write_lora)
            extras = _plan_extras(base, tuned, tensors, screened, adapter, options)
            _write_extras(base, tuned, tensors, extras, writer, settings)
            size = writer.commit()
        config = adapter_config(
            adapter,
            options.base_model or base_folder(base),
            lora_bias=bool(extras.biases),
            modules_to_save=extras.modules,
        )
        (folder.path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        folder.commit()
    return size


def _write_kohya(base, tuned, out, tensors, screened, write_pairs, kohya_of: dict[str, KohyaName], options, force):
    """The kohya file: the pairs at scale 1 (.alpha = r) under kohya's names; nothing else has a place in it."""

    def write_pair(writer, module, shape, b, a):
        write_kohya_pair(writer, kohya_of[module].prefix, shape, b, a)
        return "conv" if len(shape) == 4 else "linear"

    with SafetensorsWriter(out, None, display=out, force=force) as writer:
        adapter = write_pairs(writer, write_pair)
        for name, screen in screened.items():
            if screen.carry:
                tensors[name].reason += "; left out (a kohya file holds LoRA pairs only)"
        written = {kohya_of[module].prefix: (rank, float(rank)) for module, (rank, _) in adapter.items()}
        recorded = {kohya_of[module].prefix: kohya_of[module].module for module in adapter}
        writer.metadata = kohya_metadata(written, recorded)
        if options.base_model:
            writer.metadata["ss_sd_model_name"] = options.base_model
        return writer.commit()


def _models(checkpoint: Checkpoint) -> tuple[str, ...]:
    return checkpoint.models if isinstance(checkpoint, PipelineCheckpoint) else ()


def _check_format(base: Checkpoint, tuned: Checkpoint, options: ExtractOptions) -> None:
    """What the adapter's format cannot hold, refused before any work."""
    if _models(base) != _models(tuned):
        given = ", ".join(f"{c.source} ({'/, '.join(_models(c)) + '/' if _models(c) else 'one model'})"
                          for c in (base, tuned))  # fmt: skip
        raise UsageError(f"BASE and TUNED hold different models: {given}; give two of a kind")
    if options.format == AdapterFormat.kohya:
        if options.embeddings:
            raise UsageError(
                f"a kohya LoRA has no embedding pairs; leave out {arg('embeddings')} or write {arg('format')} peft"
            )
    elif _models(tuned):
        first = _models(tuned)[0]
        raise UsageError(
            f"{tuned.source}: a diffusers pipeline folder ({', '.join(m + '/' for m in _models(tuned))}), and a PEFT"
            f" adapter is for one model: give BASE/{first} and TUNED/{first}, or write {arg('format')} kohya"
        )


def _extract_one(
    base: Checkpoint,
    tuned: Checkpoint,
    name: str,
    report: TensorReport,
    writer: SafetensorsWriter,
    write_pair: _WritePair,
    policy: RankPolicy,
    settings: Settings,
    calibration: Calibration | None,
) -> dict[str, tuple[int, str]]:
    """Factor one module's ΔW into the adapter; returns {module: (rank, kind)}, empty if it stays out."""
    entry = tuned.entries[name]
    delta = delta_matrix(base, tuned, name, settings.device)
    if not bool(delta.any()):
        report.reason = UNCHANGED
        return {}
    where = f"{tuned.source}: tensor '{name}'"
    outcome = factor_tensor(
        delta,
        policy,
        settings,
        calibration,
        name=name,
        stored=stored_dtype(settings, entry.dtype),
        limit=min(delta.shape),
        where=where,
    )
    record(report, outcome)
    if report.status != Status.factorized:  # no rank's stored factors meet the policy's error (its reason says)
        report.status, report.rel_error = Status.skipped, None  # in no adapter: no error of its to report
        return {}
    report.status = Status.extracted
    report.kept = max(0.0, 1.0 - report.rel_error**2)
    module = name.removesuffix(".weight")
    kind = write_pair(writer, module, entry.shape, outcome.b.cpu(), outcome.a.cpu())
    return {module: (report.rank, kind)}


def _report(
    base: Checkpoint,
    tuned: Checkpoint,
    reports: list[TensorReport],
    policy: RankPolicy,
    out: Path,
    settings: Settings,
    size: int,
) -> Report:
    for report in reports:
        if report.status == Status.skipped:
            report.params_after = 0  # not in the adapter
    extracted = [t for t in reports if t.status in (Status.extracted, Status.carried)]
    return Report(
        command="extract",
        sources=[str(base.source), str(tuned.source)],
        tensors=reports,
        totals=Totals.of(extracted, tuned.nbytes, size),  # TUNED's files, the adapter's weights file
        policy=policy.as_dict(),
        output=str(out),
        options=settings.as_dict(),
    )


def base_folder(base: Checkpoint) -> str:
    """BASE's folder, absolute: where a transformers model keeps config.json beside its weights."""
    folder = base.source if base.source.is_dir() else base.source.parent
    return str(folder.resolve())


def _plan_extras(
    base: Checkpoint,
    tuned: Checkpoint,
    rows: dict[str, TensorReport],
    screened: dict[str, Screened],
    adapter: dict[str, tuple[int, str]],
    options: ExtractOptions,
) -> _Extras:
    """Which changed 1-D tensors go into the adapter, and how; the rows of the others say why not."""
    changed = [name for name, s in screened.items() if s.carry]
    if options.lora_only:
        for name in changed:
            rows[name].reason += "; left out (LoRA only)"
        return _Extras([], [])
    members = _members(tuned)
    target_biases = {name for name in changed if _module(name) in adapter and name.endswith(".bias")}
    blocker = _lora_bias_blocker(base, tuned, rows, adapter) if target_biases else None
    modules = set()
    for name in changed:
        if name in target_biases:
            why = blocker
        else:
            why = _module_blocker(_module(name), members, rows, adapter)
            if why is None:
                modules.add(_module(name))
        if why is not None:
            rows[name].reason += f"; not carried: {why}"
    biases = [f"{module}.bias" for module in adapter] if target_biases and blocker is None else []
    return _Extras(sorted(biases, key=natural_key), sorted(modules, key=natural_key))


def _lora_bias_blocker(
    base: Checkpoint, tuned: Checkpoint, rows: dict[str, TensorReport], adapter: dict[str, tuple[int, str]]
) -> str | None:
    """Why lora_bias cannot be used: PEFT gives every target a lora_B.bias, or None if it can."""
    for module, (_, kind) in sorted(adapter.items()):
        bias = f"{module}.bias"
        if kind == "embedding":
            return f"PEFT has no lora_bias for an embedding, and {module} is one"
        shapes = {tuple(c.entries[bias].shape) for c in (base, tuned) if bias in c.entries}
        if bias not in rows or len(shapes) != 1 or not tuned.entries.get(bias, base.entries[bias]).is_float:
            # A target without a bias would get one that merge_and_unload cannot merge.
            return f"lora_bias needs a bias on every LoRA target, and {module} has none in both (or not selected)"
    return None


def _module_blocker(
    module: str, members: dict[str, list[str]], rows: dict[str, TensorReport], adapter: dict[str, tuple[int, str]]
) -> str | None:
    """Why modules_to_save cannot carry `module` whole, or None if it can."""
    if not module:
        return "not in a module, and modules_to_save carries modules"
    if module in adapter:
        return f"{module} is a LoRA target, and PEFT has no place for its tensors but the bias"
    # PEFT matches modules_to_save by a plain suffix of the name: `norm` would take `fc_norm` along.
    alike = next((other for other in members if other != module and other.endswith(module)), None)
    if alike is not None:
        return f"PEFT matches modules_to_save by name suffix, and {alike} ends in {module} too"
    for name in members[module]:
        if "." in name.removeprefix(module + "."):
            return f"{module} holds submodules, which modules_to_save would carry whole"
        if name not in rows:
            return f"{module} also holds {name}, which is not selected"
        if len(rows[name].shape) >= 2:
            return f"{module} also holds the matrix {name}; modules_to_save would carry it whole"
    return None


def _members(tuned: Checkpoint) -> dict[str, list[str]]:
    """{module: the names of its tensors and its submodules' tensors}, for every module of TUNED."""
    members: dict[str, list[str]] = {}
    for name in tuned.entries:
        parts = name.split(".")
        for end in range(1, len(parts)):
            members.setdefault(".".join(parts[:end]), []).append(name)
    return members


def _module(name: str) -> str:
    return name.rpartition(".")[0]


def _write_extras(
    base: Checkpoint,
    tuned: Checkpoint,
    rows: dict[str, TensorReport],
    extras: _Extras,
    writer: SafetensorsWriter,
    settings: Settings,
) -> None:
    """Write every target's bias change (zeros where it did not change) and the modules carried whole."""
    for name in extras.biases:
        before, after = (_finite(c, name).to(torch.float64) for c in (base, tuned))
        delta = after - before  # (out,)
        stored = delta.to(stored_dtype(settings, tuned.entries[name].dtype))
        write_lora_bias(writer, _module(name), stored)
        _carried(rows[name], f"as lora_B.bias of {_module(name)} (lora_bias)")
        rows[name].rel_error = _stored_error(delta, stored)
    members = _members(tuned)
    for module in extras.modules:
        for name in members[module]:
            entry = tuned.entries[name]
            if entry.is_float:
                _finite(tuned, name)
            write_saved(writer, name, entry.dtype, entry.shape, tuned.read_bytes(name))
            _carried(rows[name], f"whole with {module} (modules_to_save)")


def _finite(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    value = checkpoint.read(name)
    check_finite(value, f"{checkpoint.entries[name].path}: tensor '{name}'", name)
    return value


def _carried(row: TensorReport, reason: str) -> None:
    row.status = Status.carried
    row.reason = reason
    row.params_after = row.params


def _stored_error(delta: torch.Tensor, stored: torch.Tensor) -> float:
    """‖Δ − stored‖ / ‖Δ‖ of a change written in a narrower dtype; 0 for no change."""
    norm = float(torch.linalg.vector_norm(delta))
    return float(torch.linalg.vector_norm(delta - stored.to(torch.float64))) / norm if norm > 0 else 0.0


def check_adapter_policy(policy: RankPolicy | None) -> None:
    """A max error of 0: no factors rounded to a float dtype hold ΔW without error, so extract would keep
    every module out, and analyze --diff would predict an adapter extract never writes."""
    if policy is not None and policy.max_error == 0:
        raise UsageError(
            f"{arg('max_error')} 0 asks for each ΔW without any error, which factors rounded to a float dtype"
            f" cannot hold; give a small error (1e-6 is about float32's rounding), or {arg('energy')} 1 for each"
            " ΔW at its full rank"
        )


def _nothing_changed(
    base: Checkpoint, tuned: Checkpoint, screened: dict[str, Screened], rows: dict[str, TensorReport]
) -> str:
    """The error when no module goes into the adapter: a changed module the policy left out and why, or a hint
    at a changed tensor left out by default."""
    kept_out = [row for name, row in rows.items() if screened[name].reason is None and row.reason != UNCHANGED]
    if kept_out:
        row = kept_out[0]
        return (
            f"{tuned.source}: {len(kept_out)} module weight(s) differ from {base.source}, but the policy keeps each"
            f" out of the adapter (first: '{row.name}', {row.reason or 'no rank saves params'}); nothing to extract"
        )
    left_out = [name for name, s in screened.items() if s.opt_in and _change(base, tuned, name) > 0]
    hint = ""
    if left_out:
        name = left_out[0]
        hint = f"; '{name}' changed but is left out by default ({screened[name].reason})"
        hint += f": pass {arg(screened[name].opt_in)}"
    return (
        f"{tuned.source}: no module weight differs from {base.source}; nothing to extract"
        f" (check the order BASE TUNED and {arg('include')}/{arg('exclude')}){hint}"
    )


def _row(base: Checkpoint, tuned: Checkpoint, name: str) -> TensorReport:
    entry = tuned.entries.get(name) or base.entries[name]
    return TensorReport(
        name=name,
        shape=list(entry.shape),
        dtype=entry.dtype,
        params=entry.numel,
        status=Status.skipped,
        file=str(entry.path),
    )


def screen(base: Checkpoint, tuned: Checkpoint, name: str, options: ExtractOptions) -> Screened:
    """Whether the tensor can go into the adapter: a reason it cannot (and the option that would let it in), or none."""
    if name not in tuned.entries:
        return Screened("only in BASE")
    if name not in base.entries:
        return Screened("only in TUNED")
    entry, other = tuned.entries[name], base.entries[name]
    if other.shape != entry.shape:
        return Screened(f"shape differs: BASE {_shape(other)}, TUNED {_shape(entry)}")
    if not (entry.is_float and other.is_float):
        return Screened(f"{entry.dtype}, not floating point")
    if len(entry.shape) < 2:
        changed = _change(base, tuned, name)
        if changed == 0:
            return Screened(f"{len(entry.shape)}-D, unchanged")
        return Screened(f"{len(entry.shape)}-D: changed by {changed:.3g} relative", carry=True)
    if entry.numel == 0:
        return Screened("empty tensor")
    if not name.endswith(".weight"):
        return Screened("not a module weight (name does not end in .weight)")
    if is_embedding(name.removesuffix(".weight"), entry.shape):
        return Screened() if options.embeddings else Screened("embedding (pass --embeddings)", "embeddings")
    if len(entry.shape) == 4:
        return Screened() if options.conv else Screened("conv kernel (pass --conv)", "conv")
    if len(entry.shape) != 2:
        return Screened(f"{len(entry.shape)}-D tensor, no LoRA layer for it")
    return Screened()


def _shape(entry: TensorEntry) -> str:
    return "×".join(map(str, entry.shape))


def _change(base: Checkpoint, tuned: Checkpoint, name: str) -> float:
    """‖after − before‖ / ‖before‖ (or ‖after − before‖ when before is zero)."""
    before = base.read(name).to(torch.float64)
    after = tuned.read(name).to(torch.float64)
    norm = float(torch.linalg.vector_norm(before))
    diff = float(torch.linalg.vector_norm(after - before))
    return diff / norm if norm > 0 else diff


def delta_matrix(base: Checkpoint, tuned: Checkpoint, name: str, device: str) -> torch.Tensor:
    """ΔW = W_tuned − W_base as an (out, in·kh·kw) matrix in float32 (float64 if either side is), checked for
    NaN/Inf: what extract factors and analyze's diff describes."""
    entry = tuned.entries[name]
    dtype = compute_dtype("F64" if "F64" in (entry.dtype, base.entries[name].dtype) else entry.dtype)
    before = base.read(name).to(device=device, dtype=dtype)
    after = tuned.read(name).to(device=device, dtype=dtype)
    for checkpoint, value in ((base, before), (tuned, after)):
        check_finite(value, f"{checkpoint.entries[name].path}: tensor '{name}'", name)
    return (after - before).reshape(entry.matrix_shape)
