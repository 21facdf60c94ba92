"""calibrate: the second moment E[x xᵀ] of every Linear layer's input, over real text.

`Calibrator` hooks a torch model and accumulates the statistics over whatever batches its owner
runs; `calibrate` runs a Hugging Face model folder over windows of a text file with it. Only the
running sums Σ x xᵀ are kept (float64, n×n per distinct input), never the activations.

`Calibrator.measure_sensitivity` then cuts one weight at a time and measures what the model's
output loses per unit of that weight's squared error: the weights `--budget` should spare.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, OutputError, UsageError, arg
from lowrank_cli.io.calibration import FINGERPRINT_WEIGHTS, fingerprint_values, write_calibration
from lowrank_cli.io.fileformat import METADATA_KEY as LOWRANK_KEY
from lowrank_cli.io.hfconfig import config_errors, is_conv1d, require_transformers
from lowrank_cli.io.paths import require_files_in
from lowrank_cli.linalg.whiten import RowWeights
from lowrank_cli.linalg.whiten import whitener as make_whitener
from lowrank_cli.ops.report import SCHEMA_VERSION
from lowrank_cli.ops.samples import batches, read_samples, require_text, sample_count, spread
from lowrank_cli.ops.settings import CALIBRATE_BATCH_SIZE, CALIBRATE_TOKENS, PROBE_TOKENS, SEQ_LEN, Split

CHUNK = 1024  # tokens per float32 product


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

    Example:
        >>> with lowrank_cli.Calibrator(model) as calibrator:
        ...     for batch in batches:
        ...         model(**batch)
        >>> calibrator.save("stats.safetensors")  # or calibrator.moments(): weight name -> E[x xᵀ]
    """

    def __init__(self, model: torch.nn.Module, *, names: dict[str, str] | None = None) -> None:
        self.model = model
        self.layers = {name: m for name, m in model.named_modules() if _is_linear(m)}
        self.embeddings = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
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
        # partial adds ≲ √CHUNK·ε₃₂ ≈ 2e-6 relative rounding, the running sum none; 2-3× faster than
        # float64 products, and small batches (short lines) pay one float64 add per CHUNK tokens.
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
                self.sums[k] += self._partial[k]
                self._partial[k].zero_()
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
        moment) or an nn.Embedding, each parameter once, is cut to the rank that keeps half its
        params, as `compress --calibration` would cut it (of W·S with a moment, else of W), and

            s = mean over the output tensors of ‖y′ − y‖² / ‖y‖²  /  Σ_{i>r} σ_i²,

        σ the singular values of W·S (or W): the same squared error the budget's spectra measure, so
        s·tail(r) estimates what any cut costs the model. The weight is restored after each probe.
        tokens: what the probe's inputs hold, recorded in the statistics file. Returns name -> s.
        """
        moments = self.moments()
        self._paused = True
        try:
            reference = _floats(run())
            for module_name, module in self.probed().items():
                name = self.names[module_name]
                moment = moments.get(name) if module_name in self.layers else None
                if moment is None and name in self.lookups:
                    moment = RowWeights.of_counts(self.lookups[name])
                value = _measure(module, moment, run, reference)
                if value is not None:  # None: nothing to cut (already low rank)
                    self.sensitivity[name] = value
                if on_weight:
                    on_weight(name)
        finally:
            self._paused = False
        self.probe_tokens = tokens
        return dict(self.sensitivity)


def _measure(
    module: torch.nn.Module, moment: torch.Tensor | RowWeights | None, run: Callable[[], object], reference
) -> float | None:
    """One weight's sensitivity: cut it in place, run the probe, put it back."""
    weight = module.weight
    transposed = is_conv1d(module)  # stored (in, out)
    cut, tail = _half_cut(weight.T if transposed else weight, moment)
    if cut is None or not tail > 0:
        return None
    original = weight.data.clone()
    try:
        weight.data.copy_(cut.T if transposed else cut)
        loss = _relative_change(reference, _floats(run()))
    finally:
        weight.data.copy_(original)
    return loss / tail


def _half_cut(weight: torch.Tensor, moment: torch.Tensor | RowWeights | None) -> tuple[torch.Tensor | None, float]:
    """W′ at the rank keeping half of W's (m, n) params, and the squared error Σ_{i>r} σ_i² the cut leaves.

    With a moment, the SVD is of W·S and W′ = U_r·Σ_r·V_rᵀ·S⁻¹ (linalg.whiten), as compress makes it;
    with an embedding's row weights, of D^½·W and W′ = D^-½·U_r·Σ_r·V_rᵀ.
    """
    m, n = weight.shape
    rank = max(1, m * n // (2 * (m + n)))
    if rank >= min(m, n):
        return None, 0.0
    dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    w = weight.detach().to(dtype)
    if isinstance(moment, RowWeights):
        whitener = moment if moment.weights.shape[0] == m else None
    else:
        whitener = make_whitener(moment.to(w.device)) if moment is not None and moment.shape[0] == n else None
    target = w if whitener is None else whitener.whiten(w)
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    b, a = u[:, :rank] * sigma[:rank], vh[:rank]
    if whitener is not None:
        b, a = whitener.unwhiten_factors(b, a)
    cut = b @ a  # (m, r) @ (r, n)
    if not bool(torch.isfinite(cut).all()):
        return None, 0.0
    return cut.to(weight.dtype), float((sigma[rank:].to(torch.float64) ** 2).sum())


def _floats(output: object) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, or a tuple, list or dict of them)."""
    if isinstance(output, torch.Tensor):
        return [output.detach()] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [tensor for item in output for tensor in _floats(item)]
    return []  # anything else (a key-value cache object, None) is not an output to compare


def _relative_change(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """The mean over output tensors of ‖y′ − y‖² / ‖y‖² (tensors that are all zero are left out)."""
    changes = []
    for y, y2 in zip(reference, outputs, strict=True):
        y, y2 = y.to(torch.float32), y2.to(torch.float32)  # a float32 temporary, float64 sums: logits can be large
        total = float(y.square().sum(dtype=torch.float64))
        if total > 0:
            changes.append(float((y2 - y).square().sum(dtype=torch.float64)) / total)
    return sum(changes) / len(changes) if changes else 0.0


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)  # GPT-2's Conv1D: a Linear stored (in, out)


def checkpoint_names(module_names: Iterable[str], keys: Iterable[str]) -> dict[str, str]:
    """Module name -> the checkpoint's weight name: MODULE.weight, or the one key that ends with it.

    A model saved with a task head prefixes the base model (`bert.encoder…`) while the loaded base
    model names it `encoder…`; and the other way round for a head model loading a bare checkpoint.
    """
    keys = set(keys)
    names = {}
    for module in module_names:
        wanted = f"{module}.weight"
        if wanted in keys:
            names[module] = wanted
            continue
        matches = [k for k in keys if k.endswith("." + wanted) or wanted.endswith("." + k)]
        if len(matches) == 1:
            names[module] = matches[0]
    return names


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
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationReport:
    """Run a Hugging Face model folder over samples of `text` and save its layers' input moments to `out`.

    Samples are read by ops.samples.read_samples (split windows, lines or auto). Each Linear's input
    moment E[x xᵀ] is kept, and each embedding table's lookups per row (its one-hot input's moment).
    sensitivity: also measure each weight's sensitivity (Calibrator.measure_sensitivity) on about
    probe_tokens tokens of the samples, which the budget of `compress --calibration` then uses.
    progress(done, total) is called after each batch and each weight probed.
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
    _check_output(out, folder, text, force)
    model, tokenizer = _load(folder, device)
    found = read_samples(tokenizer, text, seq_len=seq_len, tokens=tokens, samples=samples, split=split)
    _check_samples(model, tokenizer, found.ids, folder)
    chosen = found.ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way
    module_names = _linear_names(model) + _embedding_names(model)
    calibrator = Calibrator(model, names=checkpoint_names(module_names, _checkpoint_keys(Path(model_dir))))
    runs = batches(chosen, batch_size, device, pad)
    total = len(runs) + (len(calibrator.probed()) if sensitivity else 0)
    done = 0

    def tick(*_: object) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(min(done, total), total)

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
    if sensitivity:
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


def _check_output(out: Path, folder: Path, text: Path, force: bool) -> None:
    """The statistics file may not be written over an input (the model's files, the text), even with force."""
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give the statistics file's name with {arg('out')}")
    if out.exists():
        if any(_same_file(out, path) for path in [text, *folder.iterdir()]):
            raise OutputError(
                f"{out}: is an input of this run (the model's or the text); write the statistics elsewhere"
            )
        if not force:
            raise OutputError(f"{out}: exists; choose another output or pass {arg('force')}")
    elif out.name.endswith(".safetensors") and out.resolve().parent == folder.resolve():
        # in the model folder it would be read as one of the model's weight files by every later command
        raise OutputError(f"{out}: is inside the model folder, where it would be read as weights; write it elsewhere")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: its folder {out.parent} does not exist; create it or choose another output")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_samples(model: torch.nn.Module, tokenizer, samples: list[list[int]], folder: Path) -> None:
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


def _load(folder: Path, device: str, feature: str = "calibrate"):
    """The model (its own architecture class, so a task head runs too) and its tokenizer, offline."""
    transformers = require_transformers(feature)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: has no config.json; calibrate needs a Hugging Face model folder")
    _refuse_lowrank_weights(folder)
    try:
        architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
    except (OSError, ValueError, AttributeError, TypeError, IndexError, RecursionError) as exc:
        raise CheckpointError(
            f"{config_path}: is not a model config ({type(exc).__name__}: {exc}); give a Hugging Face model folder"
        ) from None
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar is noise beside one error line
    offline = dict(local_files_only=True, trust_remote_code=False)  # never run a folder's own code, never ask
    try:
        model = (model_class or transformers.AutoModel).from_pretrained(folder, **offline)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **offline)
    except config_errors() as exc:
        raise CheckpointError(f"{folder}: cannot be loaded with transformers ({exc})".splitlines()[0]) from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


def _refuse_lowrank_weights(folder: Path) -> None:
    """A compressed folder's factors would load as a randomly initialised model: calibrate the dense one."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                compressed = LOWRANK_KEY in (handle.metadata() or {})
        except Exception:  # noqa: BLE001 - a file transformers cannot read either; it says why below
            continue
        if compressed:
            raise CheckpointError(
                f"{path}: is a lowrank file (factors, not the model's weights); run lowrank expand {folder}"
                " and calibrate the dense folder it writes"
            )


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_linear(module)]


def _embedding_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)]


def _checkpoint_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys += list(handle.keys())
    return keys
