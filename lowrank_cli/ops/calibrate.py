"""calibrate: the second moment E[x xᵀ] of every Linear layer's input, over real text.

`Calibrator` hooks a torch model and accumulates the statistics over whatever batches its owner
runs; `calibrate` runs a Hugging Face model folder over windows of a text file with it. Only the
running sums Σ x xᵀ are kept (float64, n×n per distinct input), never the activations.

`Calibrator.measure_sensitivity` then cuts one weight at a time and measures what the model's
output loses per unit of that weight's squared error: the weights `--budget` should spare.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, MissingExtraError, OutputError, UsageError, arg
from lowrank_cli.io.calibration import write_calibration
from lowrank_cli.io.paths import require_file, require_files_in
from lowrank_cli.linalg.whiten import whitener as make_whitener
from lowrank_cli.ops.settings import Split

CHUNK = 1024  # tokens per float32 product
TOKENS = 32768  # default tokens the statistics average over (256 windows of 128)
PROBE_TOKENS = 2048  # tokens the sensitivity probe runs each time a weight is cut (16 windows of 128)


class Calibrator:
    """Forward hooks on every nn.Linear (and GPT-2 Conv1D) of `model` that sum x·xᵀ of their inputs.

        with lowrank_cli.Calibrator(model) as calibrator:
            for batch in batches:
                model(**batch)
        calibrator.save("stats.safetensors")   # or calibrator.moments(): weight name -> E[x xᵀ]

    names maps module names to the checkpoint's weight names (default: MODULE.weight). Layers that
    read the very same input tensor (q, k and v) share one sum, found on the first batch. Every row
    of x counts as a token unless `calibrator.mask` holds the batch's attention mask (then padding
    is left out): set it before each padded batch.
    """

    def __init__(self, model: torch.nn.Module, *, names: dict[str, str] | None = None) -> None:
        self.model = model
        self.layers = {name: m for name, m in model.named_modules() if _is_linear(m)}
        self.embeddings = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
        self.names = {name: (names or {}).get(name, f"{name}.weight") for name in {**self.layers, **self.embeddings}}
        self.sensitivity: dict[str, float] = {}  # weight name -> s, once measure_sensitivity has run
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

    def save(self, path: str | Path, *, text_sha256: str | None = None) -> None:
        """Write the statistics file (docs/calibration.md) that `--calibration` reads."""
        if not self.sums:
            raise UsageError("the calibrator has seen no batch; run the model inside `with calibrator:` first")
        self._flush()
        means = {key: total / self.counts[key] for key, total in self.sums.items()}
        keys = {self.names[name]: key for name, key in self.key_of.items()}
        transposed = {self.names[name] for name in self.key_of if type(self.layers[name]).__name__ == "Conv1D"}
        write_calibration(
            path,
            means,
            keys,
            tokens=self.tokens,
            text_sha256=text_sha256,
            transposed=transposed,
            sensitivity=self.sensitivity,
            probe_tokens=self.probe_tokens,
        )

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
    module: torch.nn.Module, moment: torch.Tensor | None, run: Callable[[], object], reference
) -> float | None:
    """One weight's sensitivity: cut it in place, run the probe, put it back."""
    weight = module.weight
    transposed = type(module).__name__ == "Conv1D"  # stored (in, out)
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


def _half_cut(weight: torch.Tensor, moment: torch.Tensor | None) -> tuple[torch.Tensor | None, float]:
    """W′ at the rank keeping half of W's (m, n) params, and the squared error Σ_{i>r} σ_i² the cut leaves.

    With a moment, the SVD is of W·S and W′ = U_r·Σ_r·V_rᵀ·S⁻¹ (linalg.whiten), as compress makes it.
    """
    m, n = weight.shape
    rank = max(1, m * n // (2 * (m + n)))
    if rank >= min(m, n):
        return None, 0.0
    dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    w = weight.detach().to(dtype)
    whitener = make_whitener(moment.to(w.device)) if moment is not None and moment.shape[0] == n else None
    target = w if whitener is None else whitener.whiten(w)
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    a = vh[:rank] if whitener is None else whitener.unwhiten(vh[:rank])
    cut = (u[:, :rank] * sigma[:rank]) @ a  # (m, r) @ (r, n)
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
    # transformers' Conv1D (GPT-2) is a Linear stored (in, out); matched by name so torch alone suffices.
    return isinstance(module, torch.nn.Linear) or (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None
    )


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
    seq_len: int = 128,
    tokens: int = TOKENS,
    samples: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    force: bool = False,
    split: Split = Split.windows,
    sensitivity: bool = True,
    probe_tokens: int = PROBE_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run a Hugging Face model folder over samples of `text` and save its layers' input moments to `out`.

    split: `windows` cuts the text into windows of seq_len tokens; `lines` makes each non-empty line
    one sample (cut at seq_len), for a file of prompts or sentences like the model's real inputs.
    Either way each sample is framed by the tokenizer's special tokens. Samples holding about
    `tokens` tokens (at most `samples` of them) are taken evenly over the whole text. sensitivity:
    also measure each weight's sensitivity (Calibrator.measure_sensitivity) on about probe_tokens
    tokens of them, which the budget of `compress --calibration` then uses. progress(done, total)
    is called after each batch and each weight probed. Returns a summary.
    """
    if seq_len < 2:
        raise UsageError(f"{arg('seq_len')} must be at least 2, got {seq_len}")
    for argument, value in (("tokens", tokens), ("samples", samples), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{arg(argument)} must be at least 1, got {value}")
    if sensitivity and probe_tokens < 1:
        raise UsageError(f"{arg('probe_tokens')} must be at least 1, got {probe_tokens}")
    out, text, folder = Path(out), Path(text), Path(model_dir)
    if out.exists() and not force:
        raise OutputError(f"{out}: exists; choose another output or pass {arg('force')}")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: its folder {out.parent} does not exist; create it or choose another output")
    require_file(text, f"give a UTF-8 text file with {arg('text')}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; give a Hugging Face model folder (config.json, weights)")
    require_files_in(folder, "calibrate reads every file of the model folder; remove it or give a plain copy")
    data = text.read_bytes()
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{text}: is not UTF-8 text (byte {exc.start}); give a UTF-8 text file with {arg('text')}"
        ) from None
    if not decoded.strip():
        raise UsageError(f"{text}: has no text; give a UTF-8 text file with {arg('text')}")
    transformers = _transformers()
    model, tokenizer = _load(transformers, folder, device)
    found = _lines(tokenizer, decoded, seq_len) if split == Split.lines else _windows(tokenizer, decoded, seq_len)
    if not found:
        raise UsageError(
            f"{text}: has fewer tokens than one window of {seq_len}; lower {arg('seq_len')} or give more text"
        )
    _check_samples(model, tokenizer, found, folder)
    chosen = spread(found, _count(found, tokens, samples))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way
    module_names = _linear_names(model) + _embedding_names(model)
    calibrator = Calibrator(model, names=checkpoint_names(module_names, _checkpoint_keys(Path(model_dir))))
    batches = _batches(chosen, batch_size, device, pad)
    total = len(batches) + (len(calibrator.probed()) if sensitivity else 0)
    done = 0

    def tick(*_: object) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(min(done, total), total)

    with torch.no_grad(), calibrator:
        for ids, mask in batches:
            calibrator.mask = mask
            model(input_ids=ids, attention_mask=mask)
            tick()
        calibrator.mask = None
    summary = {"tokens": calibrator.tokens, "inputs": len(calibrator.sums), "weights": len(calibrator.key_of)}
    if sensitivity:
        probe = spread(chosen, _count(chosen, probe_tokens))
        probe_batches = _batches(probe, batch_size, device, pad)
        calibrator.measure_sensitivity(
            lambda: [model(input_ids=ids, attention_mask=mask) for ids, mask in probe_batches],
            tokens=sum(len(ids) for ids in probe),
            on_weight=tick,
        )
        summary.update(sensitivities=len(calibrator.sensitivity), probe_tokens=calibrator.probe_tokens)
    if progress:
        progress(total, total)
    calibrator.save(out, text_sha256=hashlib.sha256(data).hexdigest())
    return summary


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


def _count(samples: list[list[int]], tokens: int, cap: int | None = None) -> int:
    """How many samples of their mean length hold about `tokens` tokens (at least one, at most all or cap)."""
    mean = sum(len(ids) for ids in samples) / len(samples)
    return max(1, min(len(samples), cap or len(samples), round(tokens / mean)))


def spread(items: list, count: int) -> list:
    """`count` of the items evenly over the whole list (all of them when there are no more), in order."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def _batches(
    samples: list[list[int]], batch_size: int, device: str, pad: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, attention mask) batches of batch_size samples, by length so that padding stays short.

    Windows are all one length (no padding); lines are padded to the longest of their batch, and the
    mask keeps the padding out of the statistics (Calibrator.mask).
    """
    ordered = sorted(samples, key=len)
    batches = []
    for start in range(0, len(ordered), batch_size):
        group = ordered[start : start + batch_size]
        width = max(len(ids) for ids in group)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in group], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in group], device=device)
        batches.append((ids, mask))
    return batches


def _windows(tokenizer, text: str, seq_len: int) -> list[list[int]]:
    """Consecutive windows of seq_len tokens, each framed by the tokenizer's special tokens ([CLS] … [SEP]).

    The model sees those tokens in every real input, and their activations are often the largest
    (attention sinks): statistics without them miss the directions that matter most.
    """
    tokenizer.model_max_length = 1 << 62  # the text is cut into windows below; silence the length warning
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix, suffix = _special_tokens(tokenizer)
    content = seq_len - len(prefix) - len(suffix)
    if content < 1:
        raise UsageError(f"{arg('seq_len')} {seq_len} leaves no room beside the special tokens; raise {arg('seq_len')}")
    starts = range(0, len(ids) - content + 1, content)
    return [prefix + ids[i : i + content] + suffix for i in starts]


def _lines(tokenizer, text: str, seq_len: int) -> list[list[int]]:
    """Each non-empty line as one sample, framed by the special tokens and cut to seq_len tokens."""
    tokenizer.model_max_length = 1 << 62
    prefix, suffix = _special_tokens(tokenizer)
    content = seq_len - len(prefix) - len(suffix)
    if content < 1:
        raise UsageError(f"{arg('seq_len')} {seq_len} leaves no room beside the special tokens; raise {arg('seq_len')}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    encoded = tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
    return [prefix + ids[:content] + suffix for ids in encoded if ids]


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (BERT: [CLS], [SEP]; GPT-2: none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


def _transformers():
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is None:
        raise MissingExtraError("calibrate needs transformers; pip install 'lowrank[calibrate]'")
    return transformers


def _load(transformers, folder: Path, device: str):
    """The model (its own architecture class, so a task head runs too) and its tokenizer, offline."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: has no config.json; calibrate needs a Hugging Face model folder")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar is noise beside one error line
    try:
        model = (model_class or transformers.AutoModel).from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot be loaded with transformers ({exc})".splitlines()[0]) from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


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
