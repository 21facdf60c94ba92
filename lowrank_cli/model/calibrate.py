"""calibrate: the second moment E[x xᵀ] of every Linear layer's input, over real text.

`Calibrator` hooks a torch model and accumulates the statistics over whatever batches its owner
runs; `calibrate` runs a Hugging Face model folder (ops.hfmodel) over samples of a text file
(ops.samples) with it. Only the running sums Σ x xᵀ are kept (float64, n×n per distinct input),
never the activations.

`Calibrator.measure_sensitivity` then runs the sensitivity probe (ops.sensitivity): what the
model's output loses per unit of each weight's squared error, the weights `--budget` should spare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, UsageError, arg
from lowrank_cli.io.calibration import FINGERPRINT_WEIGHTS, MomentSpill, fingerprint_values, write_calibration
from lowrank_cli.io.checkpoint import open_checkpoint
from lowrank_cli.io.hfconfig import base_prefix, is_conv1d
from lowrank_cli.io.outputs import check_statistics_output
from lowrank_cli.io.paths import require_files_in
from lowrank_cli.linalg.whiten import RowWeights
from lowrank_cli.ops.hfmodel import (
    check_samples,
    checkpoint_keys,
    checkpoint_names,
    load_model,
    load_tokenizer,
    pad_id,
)
from lowrank_cli.ops.report import SCHEMA_VERSION
from lowrank_cli.ops.samples import batches, read_samples, require_text, sample_count, spread
from lowrank_cli.ops.sensitivity import ProjectedProbe, sensitivities
from lowrank_cli.ops.settings import CALIBRATE_BATCH_SIZE, CALIBRATE_TOKENS, PROBE_TOKENS, SEQ_LEN, Split

CHUNK = 1024  # tokens per float32 product
FLUSH_ROWS = 256  # rows of a float32 partial sum added to the float64 sum at a time


@dataclass
class CalibrationReport:
    """What calibrate measured and wrote; `to_dict()` is the CLI's JSON (docs/json.md)."""

    model: str  # the model folder
    output: str  # the statistics file written
    text_sha256: str
    split: str  # windows or lines, as chosen
    samples: int
    tokens: int  # the tokens the moments average over
    inputs: int  # distinct inputs: layers that read the same input share one moment
    weights: int  # weights with a moment
    tables: int  # embedding tables with lookup counts
    sensitivities: int | None = None  # weights the sensitivity probe measured; None without it
    probe_tokens: int | None = None  # the tokens it ran each time
    notes: list[str] = field(default_factory=list)
    command: str = "calibrate"
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


class Calibrator:
    """Forward hooks on every nn.Linear (and GPT-2 Conv1D) of `model` that sum x·xᵀ of their inputs.

    Layers that read the very same input tensor (q, k and v) share one sum, found on the first
    batch. Every row of x counts as a token unless `calibrator.mask` holds the batch's attention
    mask (then padding is left out): set it before each padded batch.

    Args:
        model: any torch model; every nn.Linear, GPT-2 Conv1D and nn.Embedding in it is watched.
        names: module name -> the checkpoint's weight name (default: MODULE.weight), for a model
            whose names differ from its file's (a task model loading a base model's file).
        exclude: module names left unwatched (the block runner's blocks, watched one by one).
        linears, embeddings: whether to watch Linears (their input moments) and embeddings (their lookups).

    Example:
        >>> with lowrank_cli.Calibrator(model) as calibrator:
        ...     for batch in batches:
        ...         model(**batch)
        >>> calibrator.save("stats.safetensors")  # or calibrator.moments(): weight name -> E[x xᵀ]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        names: dict[str, str] | None = None,
        exclude: Callable[[str], bool] | None = None,
        linears: bool = True,
        embeddings: bool = True,
    ) -> None:
        self.model = model
        watched = [(name, m) for name, m in model.named_modules() if not (exclude and exclude(name))]
        self.layers = {name: m for name, m in watched if linears and _is_linear(m)}
        self.embeddings = {name: m for name, m in watched if embeddings and isinstance(m, torch.nn.Embedding)}
        self.names = {name: (names or {}).get(name, f"{name}.weight") for name in {**self.layers, **self.embeddings}}
        self.sensitivity: dict[str, float] = {}  # weight name -> s, once measure_sensitivity has run
        self.lookups: dict[str, torch.Tensor] = {}  # embedding weight name -> lookups per row (V,), float64
        self.probe_tokens = 0
        self.sums: dict[str, torch.Tensor] = {}  # key -> Σ x xᵀ, float64
        self.counts: dict[str, int] = {}
        self.key_of: dict[str, str] = {}  # module name -> the key of its input's sum
        self._owner: dict[str, bool] = {}  # whether this module's hook adds to its key's sum
        self._previous: tuple[torch.Tensor, str] | None = None  # the last input seen and its key
        self._handles: list = []
        self._paused = False  # while the sensitivity probe runs the model
        self._partial: dict[str, torch.Tensor] = {}  # key -> float32 Σ x xᵀ of the last ≤ CHUNK tokens
        self._pending: dict[str, int] = {}  # key -> tokens in that partial sum
        # A bool (batch, seq) mask of the real tokens of the batch about to run (its attention mask):
        # rows of a layer input of that shape where it is False (padding) are left out. None: all count.
        self.mask: torch.Tensor | None = None

    def __enter__(self) -> Calibrator:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        for name, module in self.embeddings.items():
            self._handles.append(module.register_forward_hook(self._lookup_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._previous = None

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: object) -> None:
            if self._paused:
                return
            x = inputs[0]
            if name not in self.key_of:  # first call: share the previous layer's sum if it read this same tensor
                shared = self._previous is not None and self._previous[0] is x
                self.key_of[name] = self._previous[1] if shared else self.names[name]
                self._owner[name] = not shared
            self._previous = (x, self.key_of[name])
            if self._owner[name]:
                self._add(self.key_of[name], x.detach())

        return hook

    def _lookup_hook(self, name: str):
        """An embedding's input is one-hot: its second moment is the diagonal of each row's lookups."""

        def hook(module: torch.nn.Module, inputs: tuple, output: object) -> None:
            ids = inputs[0]
            if self._paused or not isinstance(ids, torch.Tensor) or ids.is_floating_point():
                return
            mask, weights = self.mask, None
            if mask is not None and tuple(ids.shape) == tuple(mask.shape):
                ids = ids[mask.to(device=ids.device, dtype=torch.bool)]  # padding is no lookup of the text's
            elif mask is not None and ids.ndim == 2 and ids.shape[0] == 1 and ids.shape[1] == mask.shape[-1]:
                weights = mask.to(ids.device, torch.float64).sum(0)  # (1, seq) ids shared by the batch: positions
            counts = torch.bincount(ids.reshape(-1), weights=weights, minlength=module.num_embeddings)
            counts = counts.to(torch.float64)
            key = self.names[name]
            self.lookups[key] = self.lookups.get(key, 0) + counts[: module.num_embeddings]

        return hook

    @torch.no_grad()
    def _add(self, key: str, x: torch.Tensor) -> None:
        mask = self.mask
        if mask is not None and x.ndim == mask.ndim + 1:  # (batch, seq, n): one row per token of the mask
            if tuple(x.shape[:-1]) != tuple(mask.shape):
                raise UsageError(
                    f"calibrator.mask has shape {tuple(mask.shape)}, but '{key}' reads {tuple(x.shape[:-1])} tokens;"
                    " set it to the attention mask of the batch about to run"
                )
            rows = x[mask.to(device=x.device, dtype=torch.bool)]  # (real tokens, n): padding left out
        else:  # no mask, or an input of another shape (a pooler's first token): every row counts
            rows = x.reshape(-1, x.shape[-1])  # (tokens, n)
        n = rows.shape[1]
        if key not in self.sums:
            self.sums[key] = torch.zeros(n, n, dtype=torch.float64, device=rows.device)
            self._partial[key] = torch.zeros(n, n, dtype=torch.float32, device=rows.device)
            self._pending[key] = 0
        # float32 products summed over at most CHUNK tokens, then added to the float64 sum: each
        # partial adds ≲ √CHUNK·ε₃₂ ≈ 2e-6 relative rounding, the running sum none. A float32 product
        # moves half the bytes and fills twice the SIMD lanes of a float64 one (benchmarks/bench_kernels.py
        # times both), and small batches (short lines) pay one float64 add per CHUNK tokens.
        for start in range(0, rows.shape[0], CHUNK):
            chunk = rows[start : start + CHUNK].to(torch.float32)
            if self._pending[key] + chunk.shape[0] > CHUNK:
                self._flush(key)
            self._partial[key].addmm_(chunk.T, chunk)  # += (n, t) @ (t, n)
            self._pending[key] += chunk.shape[0]
        self.counts[key] = self.counts.get(key, 0) + rows.shape[0]

    def _flush(self, key: str | None = None) -> None:
        for k in [key] if key is not None else list(self._partial):
            if self._pending[k]:
                total, partial = self.sums[k], self._partial[k]
                for i in range(0, total.shape[0], FLUSH_ROWS):  # a band at a time: no n×n float64 copy of the partial
                    total[i : i + FLUSH_ROWS] += partial[i : i + FLUSH_ROWS]
                partial.zero_()
                self._pending[k] = 0

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)

    def moments(self) -> dict[str, torch.Tensor]:
        """Weight name -> E[x xᵀ] (float64, n×n) of every layer that has run; shared inputs share a tensor."""
        self._flush()
        means = {key: total / self.counts[key] for key, total in self.sums.items()}
        return {self.names[name]: means[key] for name, key in self.key_of.items()}

    def save(self, path: str | Path, *, text_sha256: str | None = None, force: bool = False) -> None:
        """Write the statistics file (docs/calibration.md) that `--calibration` reads; an existing file
        is replaced only with force."""
        if not self.sums:
            raise UsageError("the calibrator has seen no batch; run the model inside `with calibrator:` first")
        self._flush()
        means = {key: total / self.counts[key] for key, total in self.sums.items()}
        keys = {self.names[name]: key for name, key in self.key_of.items()}
        transposed = {self.names[name] for name in self.key_of if is_conv1d(self.layers[name])}
        lookups = {name: counts for name, counts in self.lookups.items() if name not in keys}  # a moment wins
        write_calibration(
            path,
            means,
            keys,
            tokens=self.tokens,
            text_sha256=text_sha256,
            transposed=transposed,
            sensitivity=self.sensitivity,
            probe_tokens=self.probe_tokens,
            token_counts=lookups,
            fingerprint=self.fingerprint(),
            force=force,
        )

    def fingerprint(self) -> dict[str, list[float]]:
        """A few values of some weights (io.calibration.FINGERPRINT_AT), by which a checkpoint is told
        to be this model or another of the same shapes."""
        weights = {self.names[name]: m.weight for name, m in {**self.embeddings, **self.layers}.items()}
        names = spread(sorted(weights), FINGERPRINT_WEIGHTS)
        return {name: fingerprint_values(weights[name]) for name in names}

    def probed(self) -> dict[str, torch.nn.Module]:
        """The modules measure_sensitivity cuts: each 2-D float weight once, embeddings first.

        Embeddings first, so a head tied to the input embedding (GPT-2's lm_head) is measured once,
        under the embedding's name, which is the tensor the checkpoint holds.
        """
        modules, seen = {}, set()
        for module_name, module in {**self.embeddings, **self.layers}.items():
            weight = module.weight
            if id(weight) not in seen and weight.ndim == 2 and weight.is_floating_point():
                seen.add(id(weight))
                modules[module_name] = module
        return modules

    @torch.no_grad()
    def measure_sensitivity(
        self, run: Callable[[], object], *, tokens: int = 0, on_weight: Callable[[str], None] | None = None
    ) -> dict[str, float]:
        """What the model's output loses per unit of each weight's squared error, one weight at a time.

            calibrator.measure_sensitivity(lambda: model(**probe_batch))   # after the statistics

        run() must run the model on the same inputs each time and return its output (a tensor, or a
        tuple, dict or ModelOutput of them). Each weight of a Linear (with this calibrator's input
        moment) or an nn.Embedding (with its lookups), each parameter once, is cut to the rank that
        keeps half its params, as `compress --calibration` would cut it, and

            s = mean over the output tensors of ‖y′ − y‖² / ‖y‖²  /  Σ_{i>r} σ_i²

        (ops.sensitivity). The weight is restored after each probe. tokens: what the probe's inputs
        hold, recorded in the statistics file. on_weight(name) is called after each weight.
        Returns name -> s.
        """
        moments = self.moments()

        def weights():
            for module_name, module in self.probed().items():
                name = self.names[module_name]
                moment = moments.get(name) if module_name in self.layers else None
                if moment is None and name in self.lookups:
                    moment = RowWeights.of_counts(self.lookups[name])
                yield name, module, moment

        self._paused = True
        try:
            for name, value in sensitivities(run, weights()):
                if value is not None:  # None: nothing to cut (already low rank)
                    self.sensitivity[name] = value
                if on_weight:
                    on_weight(name)
        finally:
            self._paused = False
        self.probe_tokens = tokens
        return dict(self.sensitivity)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)  # GPT-2's Conv1D: a Linear stored (in, out)


def calibrate(
    model_dir: str | Path,
    out: str | Path,
    text: str | Path,
    *,
    seq_len: int = SEQ_LEN,
    tokens: int = CALIBRATE_TOKENS,
    samples: int | None = None,
    batch_size: int = CALIBRATE_BATCH_SIZE,
    device: str = "cpu",
    force: bool = False,
    split: Split = Split.auto,
    sensitivity: bool = True,
    probe_tokens: int = PROBE_TOKENS,
    exact_sensitivity: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationReport:
    """Run a Hugging Face model folder over samples of `text` and save its layers' input moments to `out`.

    Samples are read by ops.samples.read_samples (split windows, lines or auto). Each Linear's input
    moment E[x xᵀ] is kept, and each embedding table's lookups per row (its one-hot input's moment).
    The model runs block by block (model.blocks.BlockRunner): every sample goes through one block, whose
    moments are then put on disk (io.calibration.MomentSpill) before the next block is loaded, so memory
    holds one block, its moments and the samples' activations (docs/calibration.md gives the formula).

    sensitivity: also measure each weight's sensitivity on about probe_tokens tokens of the samples, which
    the budget of `compress --calibration` then uses: estimated in one backward pass through the blocks
    (ops.sensitivity.ProjectedProbe). exact_sensitivity: measure it as the reference does instead, one
    forward of the whole model (loaded whole, in float32) per weight (Calibrator.measure_sensitivity).
    progress(done, total) is called after each block and each weight probed.
    """
    if batch_size < 1:
        raise UsageError(f"{arg('batch_size')} must be at least 1, got {batch_size}")
    if sensitivity and probe_tokens < 1:
        raise UsageError(f"{arg('probe_tokens')} must be at least 1, got {probe_tokens}")
    out, text, folder = Path(out), Path(text), Path(model_dir)
    require_text(text)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; give a Hugging Face model folder (config.json, weights)")
    require_files_in(folder, "calibrate reads every file of the model folder; remove it or give a plain copy")
    check_statistics_output(out, folder, text, force=force)
    options = dict(seq_len=seq_len, tokens=tokens, samples=samples, batch_size=batch_size, device=device, split=split)
    if sensitivity and exact_sensitivity:
        return _calibrate_whole(folder, out, text, force=force, probe_tokens=probe_tokens, progress=progress, **options)
    return _calibrate_blocks(
        folder, out, text, force=force, sensitivity=sensitivity, probe_tokens=probe_tokens, progress=progress, **options
    )


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[..., None]:
    done = 0

    def tick(*_: object) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(min(done, total), total)

    return tick


def _calibrate_blocks(
    folder: Path,
    out: Path,
    text: Path,
    *,
    seq_len: int,
    tokens: int,
    samples: int | None,
    batch_size: int,
    device: str,
    force: bool,
    split: Split,
    sensitivity: bool,
    probe_tokens: int,
    progress: Callable[[int, int], None] | None,
) -> CalibrationReport:
    """calibrate, one block of the model in memory at a time (see calibrate)."""
    from lowrank_cli.model.blocks import BlockRunner

    tokenizer = load_tokenizer(folder)
    found = read_samples(tokenizer, text, seq_len=seq_len, tokens=tokens, samples=samples, split=split)
    chosen = found.ids
    pad = pad_id(tokenizer)
    with BlockRunner(folder, device=device, dtype=torch.float32) as runner, MomentSpill(out) as spill:
        model = runner.model
        check_samples(model, tokenizer, chosen, folder)
        prefix = runner.blocks_name + "."
        names = checkpoint_names(
            _linear_names(model) + _embedding_names(model), checkpoint_keys(folder), base_prefix(model)
        )
        names = {
            module: names.get(module, f"{module}.weight") for module in _linear_names(model) + _embedding_names(model)
        }
        runs = batches(chosen, batch_size, device, pad)
        probe = spread(chosen, sample_count(chosen, probe_tokens)) if sensitivity else []
        probe_runs = batches(probe, batch_size, device, pad)
        probed = ProjectedProbe(runner, names, spill=out.parent) if sensitivity else None  # probe inputs on disk
        tick = _ticker(progress, len(runner) + (probed.count() if probed else 0))

        def inside(name: str) -> bool:
            return name == runner.blocks_name or name.startswith(prefix)

        stem = Calibrator(model, names=names, exclude=inside, linears=False)  # the embeddings' lookups
        with torch.no_grad(), stem:
            hidden = []
            for ids, mask in runs:
                stem.mask = mask
                hidden.append(runner.embed(ids, mask))
            stem._paused = True
            probe_hidden = [runner.embed(ids, mask) for ids, mask in probe_runs]
        keys: dict[str, str] = {}
        transposed: set[str] = set()
        counted = 0
        for block in runner.blocks():
            local = {name: names[f"{block.name}.{name}"] for name, m in block.module.named_modules() if _is_linear(m)}
            calibrator = Calibrator(block.module, names=local, embeddings=False)
            with torch.no_grad(), calibrator:
                for index, batch in enumerate(hidden):
                    calibrator.mask = batch.attention_mask
                    hidden[index] = runner.run_block(block, batch)
            calibrator._flush()
            calibrator._partial.clear()
            for key, total in calibrator.sums.items():
                spill.add(key, total.div_(calibrator.counts[key]))  # in place: no second float64 copy
            keys.update({calibrator.names[name]: key for name, key in calibrator.key_of.items()})
            transposed |= {calibrator.names[name] for name in calibrator.key_of if is_conv1d(calibrator.layers[name])}
            counted = max(counted, calibrator.tokens)
            del calibrator  # its sums: one block's moments at a time
            if probed is not None:
                probe_hidden = probed.forward(block, probe_hidden)
            tick()
        head = Calibrator(model, names=names, exclude=inside, embeddings=False)  # head (and stem) Linears
        if head.layers:
            with torch.no_grad(), head:
                for batch in hidden:
                    for _, _, piece in ProjectedProbe._pieces(batch):  # a few samples' logits at a time
                        head.mask = piece.attention_mask
                        runner.head(piece)
            head._flush()
            for key, total in head.sums.items():
                spill.add(key, total.div_(head.counts[key]))
            keys.update({head.names[name]: key for name, key in head.key_of.items()})
            transposed |= {head.names[name] for name in head.key_of if is_conv1d(head.layers[name])}
            counted = max(counted, head.tokens)
        del hidden
        report = CalibrationReport(
            model=str(folder),
            output=str(out),
            text_sha256=found.text_sha256,
            split=found.split.value,
            samples=len(chosen),
            tokens=counted,
            inputs=len(spill.entries),
            weights=len(keys),
            tables=len(stem.lookups),
            notes=found.notes,
        )
        measured: dict[str, float] = {}
        if probed is not None:

            def moment_of(name: str):
                if name in keys:
                    return spill.read(keys[name])  # float32: the whitener makes its one float64 copy
                if name in stem.lookups:
                    return RowWeights.of_counts(stem.lookups[name])
                return None

            measured = probed.backward(probe_hidden, moment_of, on_weight=tick)
            report.sensitivities, report.probe_tokens = len(measured), sum(len(ids) for ids in probe)
        if progress:
            tick_total = len(runner) + (probed.count() if probed else 0)
            progress(tick_total, tick_total)
        lookups = {name: counts for name, counts in stem.lookups.items() if name not in keys}  # a moment wins
        spill.write(
            keys,
            tokens=counted,
            text_sha256=found.text_sha256,
            transposed=transposed,
            sensitivity=measured,
            probe_tokens=report.probe_tokens or 0,
            token_counts=lookups,
            fingerprint=_fingerprint(folder, sorted(set(names.values()))),
            force=force,
        )
    return report


def _fingerprint(folder: Path, names: list[str]) -> dict[str, list[float]]:
    """Calibrator.fingerprint of a model left on disk: the same weights, read from the folder's files
    (a name the files do not hold, a tied head, is left out: it is never checked)."""
    with open_checkpoint(folder) as checkpoint:
        return {
            name: fingerprint_values(checkpoint.read(name))
            for name in spread(names, FINGERPRINT_WEIGHTS)
            if name in checkpoint.entries
        }


def _calibrate_whole(
    folder: Path,
    out: Path,
    text: Path,
    *,
    seq_len: int,
    tokens: int,
    samples: int | None,
    batch_size: int,
    device: str,
    force: bool,
    split: Split,
    probe_tokens: int,
    progress: Callable[[int, int], None] | None,
) -> CalibrationReport:
    """calibrate with the reference sensitivity probe: the whole model loaded, one forward per weight probed."""
    model, tokenizer = load_model(folder, device)
    found = read_samples(tokenizer, text, seq_len=seq_len, tokens=tokens, samples=samples, split=split)
    check_samples(model, tokenizer, found.ids, folder)
    chosen = found.ids
    pad = pad_id(tokenizer)
    module_names = _linear_names(model) + _embedding_names(model)
    calibrator = Calibrator(model, names=checkpoint_names(module_names, checkpoint_keys(folder), base_prefix(model)))
    runs = batches(chosen, batch_size, device, pad)
    total = len(runs) + len(calibrator.probed())
    tick = _ticker(progress, total)
    with torch.no_grad(), calibrator:
        for ids, mask in runs:
            calibrator.mask = mask
            model(input_ids=ids, attention_mask=mask)
            tick()
        calibrator.mask = None
    report = CalibrationReport(
        model=str(folder),
        output=str(out),
        text_sha256=found.text_sha256,
        split=found.split.value,
        samples=len(chosen),
        tokens=calibrator.tokens,
        inputs=len(calibrator.sums),
        weights=len(calibrator.key_of),
        tables=len(calibrator.lookups),
        notes=found.notes,
    )
    probe = spread(chosen, sample_count(chosen, probe_tokens))
    probe_batches = batches(probe, batch_size, device, pad)
    calibrator.measure_sensitivity(
        lambda: [model(input_ids=ids, attention_mask=mask) for ids, mask in probe_batches],
        tokens=sum(len(ids) for ids in probe),
        on_weight=tick,
    )
    report.sensitivities, report.probe_tokens = len(calibrator.sensitivity), calibrator.probe_tokens
    if progress:
        progress(total, total)
    calibrator.save(out, text_sha256=found.text_sha256, force=force)
    return report


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_linear(module)]


def _embedding_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)]
