"""LoRA adapters as files hold them, PEFT folders and kohya files, read as one list of pairs.

PEFT (io.peft): a folder of adapter_model.safetensors and adapter_config.json,

    base_model.model.<module>.lora_A.weight  (r, in[, k…])   .lora_B.weight  (out, r[, 1…])
    base_model.model.<module>.lora_embedding_A  (r, vocab)  .lora_embedding_B  (dim, r)

scale lora_alpha / r, with alpha_pattern and rank_pattern per module (lora_alpha / √r with use_rslora).

kohya (sd-scripts; diffusers' load_lora_weights and ComfyUI read it): one .safetensors file,

    lora_unet_<path>.lora_down.weight  (r, in[, kh, kw])   .lora_up.weight  (out, r[, 1, 1])
    lora_unet_<path>.alpha  ()   scale alpha / r (no .alpha: alpha = r); lora_te_… for text encoders

Either way ΔW = scale · up·down, with up read as an (out, r) matrix and down as (r, in·k…).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError
from lowrank_cli.io.checkpoint import Checkpoint, natural_key, open_checkpoint
from lowrank_cli.io.kohya import KOHYA_ALPHA, KOHYA_DOWN, KOHYA_UP
from lowrank_cli.io.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS

PEFT_PREFIX = "base_model.model."
_PEFT_KEYS = {  # (up, down) suffixes of a PEFT pair
    "linear": (".lora_B.weight", ".lora_A.weight"),
    "embedding": (".lora_embedding_B", ".lora_embedding_A"),
}
# Adapters that are not an up·down pair: their ΔW is another product, which a LoRA resize does not cover.
_NOT_LORA = {
    "hada_w": "LoHa (a Hadamard product)",
    "lokr_w": "LoKr (a Kronecker product)",
    "lora_mid": "LoCon with a Tucker core (lora_mid)",
    "dora_scale": "DoRA (a magnitude per column)",
    "lora_magnitude_vector": "DoRA (a magnitude per column)",
}


@dataclass(frozen=True)
class LoraPair:
    """One module's LoRA: ΔW = scale · up·down."""

    module: str  # PEFT: the module's name in the model; kohya: the key prefix (lora_unet_…)
    up: str  # the key of B (out, r[, 1…])
    down: str  # the key of A (r, in[, k…])
    rank: int
    scale: float
    alpha: str | None = None  # kohya: the key of its .alpha

    @property
    def is_embedding(self) -> bool:
        """PEFT's embedding LoRA (lora_embedding_A/B): ΔW held transposed, and no kohya counterpart."""
        return self.up.endswith(_PEFT_KEYS["embedding"][0])


@dataclass
class LoraAdapter:
    """An adapter opened for reading: its pairs, in name order, and the file that holds them."""

    format: str  # "peft" or "kohya"
    source: Path  # the PEFT folder or the kohya file
    checkpoint: Checkpoint
    pairs: list[LoraPair]
    config: dict | None = None  # PEFT: adapter_config.json

    @property
    def others(self) -> list[str]:
        """The tensors that are no part of a pair (PEFT: lora_B.bias, modules_to_save), copied as they are."""
        taken = {key for pair in self.pairs for key in (pair.up, pair.down, pair.alpha) if key}
        return [name for name in self.checkpoint.entries if name not in taken]

    def factors(self, pair: LoraPair, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(up as (out, r), down as (r, in·k…)) in float64."""
        up = self.checkpoint.read(pair.up).to(device=device, dtype=torch.float64)
        down = self.checkpoint.read(pair.down).to(device=device, dtype=torch.float64)
        return up.reshape(up.shape[0], pair.rank), down.reshape(pair.rank, -1)

    def delta_shape(self, pair: LoraPair) -> tuple[int, ...]:
        """The shape of ΔW: (out, in[, k…]); an embedding's as PEFT's factors hold it, (dim, vocab)."""
        return (self.checkpoint.entries[pair.up].shape[0], *self.checkpoint.entries[pair.down].shape[1:])

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_adapter(path: str | Path) -> LoraAdapter:
    """A PEFT adapter folder (adapter_config.json beside adapter_model.safetensors) or a kohya .safetensors file."""
    path = Path(path)
    if path.is_dir():
        return _open_peft(path)
    checkpoint = open_checkpoint(path)
    try:
        return _kohya(path, checkpoint)
    except BaseException:
        checkpoint.close()
        raise


def _open_peft(folder: Path) -> LoraAdapter:
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}; give a PEFT adapter folder or a kohya .safetensors file")
    if not weights.is_file():
        found = (
            "adapter_model.bin is a pickle; save the adapter with safetensors"
            if (folder / "adapter_model.bin").exists()
            else f"no {ADAPTER_WEIGHTS}"
        )
        raise CheckpointError(f"{folder}: {found}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: not readable JSON ({exc}); repair or re-save the adapter") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_path}: holds a JSON {type(config).__name__}, not an object of LoraConfig's fields;"
            " repair or re-save the adapter"
        )
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (LORA) resize"
        )
    if config.get("use_dora"):
        raise CheckpointError(
            f"{config_path}: a DoRA adapter (use_dora); its magnitudes depend on the base weights,"
            " so it does not resize as a LoRA"
        )
    scaling = _Scaling.of(config, config_path)
    checkpoint = open_checkpoint(weights)
    try:
        _refuse_other_kinds(checkpoint, weights)
        pairs = []
        for name in checkpoint.entries:
            for up_suffix, down_suffix in _PEFT_KEYS.values():
                if name.endswith(down_suffix):
                    prefix = name.removesuffix(down_suffix)
                    module = prefix.removeprefix(PEFT_PREFIX)
                    rank = _rank(checkpoint, weights, prefix + up_suffix, name)
                    pairs.append(LoraPair(module, prefix + up_suffix, name, rank, scaling.scale(module, rank)))
    except BaseException:
        checkpoint.close()
        raise
    return LoraAdapter("peft", folder, checkpoint, _sorted(pairs, weights), config)


@dataclass(frozen=True)
class _Scaling:
    """LoraConfig's fields that set each module's rank and scale, read as PEFT reads them.

    PEFT (tuners/lora/model.py, _create_and_replace) takes a module's r and lora_alpha from the first
    rank_pattern / alpha_pattern key matching the end of its name (peft.utils.other.get_pattern_key),
    else from r and lora_alpha; it builds the layer at that r, whose tensors must have it, and scales
    by lora_alpha / r, or lora_alpha / √r with use_rslora (tuners/lora/layer.py, update_layer).
    LoraConfig's defaults: r = 8, lora_alpha = 8. Like PEFT, a value is checked where a module uses it.
    """

    path: Path
    r: object
    lora_alpha: object
    rank_pattern: dict[str, object]
    alpha_pattern: dict[str, object]
    use_rslora: bool

    @classmethod
    def of(cls, config: dict, path: Path) -> _Scaling:
        use_rslora = config.get("use_rslora") or False
        if not isinstance(use_rslora, bool):
            raise CheckpointError(f"{path}: use_rslora is {use_rslora!r}; PEFT reads true or false")
        return cls(
            path,
            config.get("r", 8),
            config.get("lora_alpha", 8),
            _pattern(config, path, "rank_pattern"),
            _pattern(config, path, "alpha_pattern"),
            use_rslora,
        )

    def scale(self, module: str, rank: int) -> float:
        """The module's scale as PEFT computes it; refused where the config's rank is not its tensors'."""
        r_field, r = _pattern_value(self.rank_pattern, "rank_pattern", module, ("r", self.r))
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise CheckpointError(f"{self.path}: {r_field} is {r!r}; PEFT needs a rank, a whole number ≥ 1")
        if r != rank:
            raise CheckpointError(
                f"{self.path}: {r_field} is {r} for '{module}', whose tensors have rank {rank}, so PEFT would not"
                f" load the adapter; set it to {rank}"
            )
        alpha_field, given = _pattern_value(
            self.alpha_pattern, "alpha_pattern", module, ("lora_alpha", self.lora_alpha)
        )
        alpha = _finite(given)
        if alpha is None:
            raise CheckpointError(
                f"{self.path}: {alpha_field} is {given!r}; PEFT scales ΔW by it, so it must be a finite number"
            )
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _finite(value: object) -> float | None:
    """A JSON number as a finite float, or None (true/false, null, text, NaN, ±Infinity, an int past float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _pattern(config: dict, path: Path, field: str) -> dict[str, object]:
    """A rank_pattern or alpha_pattern's items, each key checked as the regular expression PEFT makes of it."""
    pattern = config.get(field)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise CheckpointError(f"{path}: {field} is {pattern!r}; PEFT reads an object of module name: value")
    for key in pattern:
        try:
            re.compile(_key_regex(key))
        except re.error as exc:
            raise CheckpointError(
                f"{path}: {field} key {key!r} is no regular expression ({exc}); PEFT matches its keys as such"
            ) from None
    return pattern


def _key_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _pattern_value(
    pattern: dict[str, object], name: str, module: str, default: tuple[str, object]
) -> tuple[str, object]:
    """(where it comes from, the value) by PEFT's rule (peft.utils.other.get_pattern_key): the first key
    matching the end of the module's name, else the default."""
    key = next((key for key in pattern if re.match(_key_regex(key), module)), None)
    return default if key is None else (f"{name} {key!r}", pattern[key])


def _kohya(path: Path, checkpoint: Checkpoint) -> LoraAdapter:
    _refuse_other_kinds(checkpoint, path)
    pairs = []
    for name in checkpoint.entries:
        if name.endswith(KOHYA_DOWN):
            prefix = name.removesuffix(KOHYA_DOWN)
            rank = _rank(checkpoint, path, prefix + KOHYA_UP, name)
            alpha_key = prefix + KOHYA_ALPHA
            alpha = _kohya_alpha(checkpoint, path, alpha_key) if alpha_key in checkpoint.entries else float(rank)
            pairs.append(LoraPair(prefix, prefix + KOHYA_UP, name, rank, alpha / rank, alpha_key))
    if not pairs:
        hint = (
            "; it holds PEFT keys (lora_A/lora_B): give the adapter's folder, with its adapter_config.json"
            if any(".lora_A." in name for name in checkpoint.entries)
            else ""
        )
        raise CheckpointError(f"{path}: no kohya LoRA pairs (*.lora_down.weight and *.lora_up.weight){hint}")
    return LoraAdapter("kohya", path, checkpoint, _sorted(pairs, path))


def _rank(checkpoint: Checkpoint, path: Path, up: str, down: str) -> int:
    """The pair's rank, checked: up (out, r[, 1…]) and down (r, …) agree, r ≥ 1, both floating point."""
    if up not in checkpoint.entries:
        raise CheckpointError(f"{path}: '{down}' has no partner '{up}'; the adapter is incomplete")
    up_shape, down_shape = checkpoint.entries[up].shape, checkpoint.entries[down].shape
    if len(up_shape) < 2 or len(down_shape) < 2 or up_shape[1] != down_shape[0]:
        raise CheckpointError(
            f"{path}: '{up}' {tuple(up_shape)} and '{down}' {tuple(down_shape)} are no LoRA pair (ranks differ)"
        )
    if any(size != 1 for size in up_shape[2:]):
        raise CheckpointError(
            f"{path}: '{up}' is a {'×'.join(map(str, up_shape[2:]))} kernel;"
            " only 1×1 up-projections (a LoRA's B) resize"
        )
    for key in (up, down):
        entry = checkpoint.entries[key]
        if not (entry.is_known and entry.is_float):
            raise CheckpointError(
                f"{path}: '{key}' is {entry.dtype}; a LoRA's factors are floating point, so it is no LoRA weight:"
                " repair or re-save the adapter"
            )
        if entry.numel == 0:
            raise CheckpointError(
                f"{path}: '{key}' {tuple(entry.shape)} is empty (rank {down_shape[0]}); a LoRA pair has rank ≥ 1"
                " and non-empty factors: remove the pair or re-save the adapter"
            )
    return int(down_shape[0])


def _kohya_alpha(checkpoint: Checkpoint, path: Path, key: str) -> float:
    """A pair's .alpha: one finite number (sd-scripts writes a float32 scalar)."""
    entry = checkpoint.entries[key]
    numeric = entry.is_known and (entry.is_float or entry.dtype[0] in "IU")  # an integer alpha is a number too
    if not numeric or entry.numel != 1:
        raise CheckpointError(
            f"{path}: '{key}' is {entry.dtype} {tuple(entry.shape)}; a kohya alpha is one number (a float32 scalar):"
            " repair or re-save the adapter"
        )
    alpha = float(checkpoint.read(key).to(torch.float64).reshape(-1)[0])
    if not math.isfinite(alpha):
        raise CheckpointError(f"{path}: '{key}' is {alpha}; a kohya alpha scales ΔW, so it must be finite: repair it")
    return alpha


def _refuse_other_kinds(checkpoint: Checkpoint, path: Path) -> None:
    for name in checkpoint.entries:
        for mark, kind in _NOT_LORA.items():
            if mark in name:
                raise CheckpointError(f"{path}: '{name}' belongs to {kind}, not a LoRA pair; lowrank resizes LoRA only")


def _sorted(pairs: list[LoraPair], path: Path) -> list[LoraPair]:
    if not pairs:
        raise CheckpointError(f"{path}: no LoRA pairs in it; nothing to resize")
    return sorted(pairs, key=lambda pair: natural_key(pair.module))
