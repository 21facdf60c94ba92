"""The calibration statistics file (docs/calibration.md): a layer input's second moment per weight.

    tensors:  KEY -> float32 (n, n), E[x xᵀ] over every token of the layer's input x (n features)
    __metadata__["lowrank_calibration"] = JSON {
        "format_version": 1,
        "tokens": N,                      # tokens each moment averages over
        "text_sha256": "…" | null,        # the calibration text's hash (lowrank calibrate)
        "inputs": {WEIGHT_NAME: KEY, …},  # weights that read the same input share one KEY
        "transposed": [WEIGHT_NAME, …],   # weights stored (in, out), GPT-2's Conv1D
        "token_counts": {WEIGHT_NAME: KEY, …},  # optional: an embedding table's lookups per row, (V,)
        "fingerprint": {WEIGHT_NAME: [v, …], …},  # optional: a few values of some weights, to tell
                                          # the model the statistics were made on (check_model)
        "sensitivity": {WEIGHT_NAME: s, …},  # optional: the model's output error per unit of this
                                          # weight's squared error (ops.sensitivity)
        "probe_tokens": N                 # optional: the tokens the sensitivity was measured on
    }

WEIGHT_NAME is the checkpoint's own tensor name, so `--calibration` finds each tensor's moment by name.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, OutputError
from lowrank_cli.io.paths import require_file
from lowrank_cli.io.publish import make_temp, remove_temp, write_file

METADATA_KEY = "lowrank_calibration"
FORMAT_VERSION = 1


class StoredMoments(Mapping):
    """Weight name -> its moment, read from the statistics file when asked for: never all in memory at once.

    A 1B model's moments are several GB of float32 (a 70B model's, over 40 GB), more than its weights
    in bfloat16; compress reads them one weight at a time. They are read with plain file reads, not
    through a mapping of the file, whose pages would stay in the process's resident set. The last
    moment read is kept, so weights that share an input (q, k, v) get one tensor, read once.
    """

    def __init__(self, path: str | Path, keys: dict[str, str]) -> None:
        self.path, self.keys = str(path), dict(keys)
        self._where = _tensor_offsets(self.path)
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self.keys[name]
        if self._last is None or self._last[0] != key:
            self._last = None  # the previous one freed before the next is read
            self._last = (key, _read_tensor(self.path, self._where, key))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, name: object) -> bool:
        return name in self.keys


def _tensor_offsets(path: str) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """A safetensors file's tensors (already validated by safe_open): key -> dtype, shape, start, end in the file."""
    from lowrank_cli.io.dtypes import torch_dtype

    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return {
        key: (torch_dtype(info["dtype"]), list(info["shape"]), 8 + size + info["data_offsets"][0],
              8 + size + info["data_offsets"][1])
        for key, info in header.items()
    }  # fmt: skip


def _read_tensor(path: str, where: dict, key: str) -> torch.Tensor:
    dtype, shape, start, end = where[key]
    data = bytearray(end - start)
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            got = handle.readinto(data)
    except OSError as exc:
        raise CheckpointError(
            f"{path}: moment '{key}' cannot be read ({exc.strerror or exc}); check the file"
        ) from None
    if got != len(data):
        raise CheckpointError(
            f"{path}: moment '{key}' is cut short; the statistics file changed while in use, rerun lowrank calibrate"
        )
    return torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.zeros(shape, dtype=dtype)


@dataclass
class Calibration:
    """Moments by weight name (shared inputs share one tensor), and where they came from.

    moments: a dict, or StoredMoments (read_calibration's), which reads each moment from the file when asked.
    """

    moments: Mapping[str, torch.Tensor]
    tokens: int = 0
    text_sha256: str | None = None
    transposed: set[str] = field(default_factory=set)
    source: str = ""
    sensitivity: dict[str, float] = field(default_factory=dict)  # weight name -> s (docs/calibration.md)
    token_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # embedding name -> lookups per row (V,)
    fingerprint: dict[str, list[float]] = field(default_factory=dict)  # weight name -> values at FINGERPRINT_AT

    def moment_for(self, name: str) -> torch.Tensor | None:
        return self.moments.get(name)


def write_calibration(
    path: str | Path,
    moments: dict[str, torch.Tensor],
    keys: dict[str, str],
    *,
    tokens: int,
    text_sha256: str | None = None,
    transposed: set[str] | None = None,
    sensitivity: dict[str, float] | None = None,
    probe_tokens: int = 0,
    token_counts: dict[str, torch.Tensor] | None = None,
    fingerprint: dict[str, list[float]] | None = None,
    force: bool = False,
) -> None:
    """Save moments (KEY -> (n, n)) with the weight-name -> KEY map; whole or not at all (io.publish.write_file).

    Without force, a file that exists by the time it is written (another run's) is never replaced:
    OutputError, and nothing of this run is left.
    """
    from safetensors.torch import save_file

    payload = _payload(
        keys, tokens=tokens, text_sha256=text_sha256, transposed=transposed, sensitivity=sensitivity,
        probe_tokens=probe_tokens, token_counts=token_counts, fingerprint=fingerprint,
    )  # fmt: skip
    tensors = {key: moment.to(torch.float32).contiguous() for key, moment in moments.items()}
    if token_counts:
        tensors.update({f"{name}:token_counts": c.to(torch.float64).contiguous() for name, c in token_counts.items()})

    def write(temporary: Path) -> None:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(payload)})

    _write(Path(path), write, force)


def _payload(
    keys: dict[str, str],
    *,
    tokens: int,
    text_sha256: str | None,
    transposed: set[str] | None,
    sensitivity: dict[str, float] | None,
    probe_tokens: int,
    token_counts: dict[str, torch.Tensor] | None,
    fingerprint: dict[str, list[float]] | None,
) -> dict:
    """The metadata of a statistics file (the module docstring)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "tokens": int(tokens),
        "text_sha256": text_sha256,
        "inputs": keys,
        "transposed": sorted(transposed or ()),
    }
    if sensitivity:
        payload["sensitivity"] = {name: float(value) for name, value in sorted(sensitivity.items())}
        payload["probe_tokens"] = int(probe_tokens)
    if token_counts:
        payload["token_counts"] = {name: f"{name}:token_counts" for name in sorted(token_counts)}
    if fingerprint:
        payload["fingerprint"] = {name: [float(v) for v in values] for name, values in sorted(fingerprint.items())}
    return payload


def _write(path: Path, write, force: bool) -> None:
    try:
        write_file(path, write, force=force)
    except OSError as exc:  # a full disk, a read-only folder: nothing is left behind
        reason = exc.strerror or str(exc)
        raise OutputError(f"{path}: cannot be written ({reason}); free space or choose another output") from None


class MomentSpill:
    """Moments kept on disk as they are made, then written as a statistics file (write_calibration's format).

    `lowrank calibrate` adds each block's moments as the block finishes and frees them, so that no more
    than one block's moments are ever in memory: they go, float32, to a temporary file beside the
    statistics file (removed by close(), or on an interrupt), from which `write` copies them under the
    safetensors header once the metadata (sensitivities) is known. The statistics file appears whole
    or not at all, as with write_calibration.

    Example:
        >>> with MomentSpill(out) as spill:
        ...     spill.add("model.layers.0.self_attn.q_proj.weight", moment)  # (n, n)
        ...     spill.write(keys, tokens=4096, force=False)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.spill = make_temp(self.path, kind="moments")
            self._handle = open(self.spill, "r+b")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OutputError(
                f"{self.path}: cannot be written ({reason}); free space or choose another output"
            ) from None
        self.entries: dict[str, tuple[list[int], int, int]] = {}  # key -> shape, start, end (bytes in the spill)
        self._end = 0

    def add(self, key: str, moment: torch.Tensor) -> None:
        """Append one moment (stored float32, as in the statistics file)."""
        # written from the array itself: no bytes copy of a moment (a 1B model's MLP input: 127 MB)
        data = moment.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        try:
            self._handle.seek(self._end)
            self._handle.write(memoryview(data).cast("B"))
        except OSError as exc:  # a full disk: the statistics cannot be written either
            reason = exc.strerror or str(exc)
            raise OutputError(
                f"{self.path}: cannot be written ({reason}); free space or choose another output"
            ) from None
        self.entries[key] = (list(moment.shape), self._end, self._end + data.nbytes)
        self._end += data.nbytes

    def read(self, key: str) -> torch.Tensor:
        """A moment added before, read back (float32)."""
        shape, start, end = self.entries[key]
        self._handle.flush()
        self._handle.seek(start)
        data = bytearray(self._handle.read(end - start))
        return torch.frombuffer(data, dtype=torch.float32).reshape(shape) if data else torch.zeros(shape)

    def write(
        self,
        keys: dict[str, str],
        *,
        tokens: int,
        text_sha256: str | None = None,
        transposed: set[str] | None = None,
        sensitivity: dict[str, float] | None = None,
        probe_tokens: int = 0,
        token_counts: dict[str, torch.Tensor] | None = None,
        fingerprint: dict[str, list[float]] | None = None,
        force: bool = False,
    ) -> None:
        """Write the statistics file: the moments added, with write_calibration's metadata."""
        payload = _payload(
            keys, tokens=tokens, text_sha256=text_sha256, transposed=transposed, sensitivity=sensitivity,
            probe_tokens=probe_tokens, token_counts=token_counts, fingerprint=fingerprint,
        )  # fmt: skip
        counts = {f"{name}:token_counts": c.to(torch.float64).contiguous() for name, c in (token_counts or {}).items()}
        header: dict = {"__metadata__": {METADATA_KEY: json.dumps(payload)}}
        offset = 0
        for key, tensor in counts.items():  # float64 first, so every tensor starts at a multiple of its size
            header[key] = {
                "dtype": "F64",
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.numel() * 8],
            }
            offset += tensor.numel() * 8
        for key, (shape, start, end) in self.entries.items():
            header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset + start, offset + end]}
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self._handle.flush()

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as out:
                out.write(struct.pack("<Q", len(encoded)))
                out.write(encoded)
                for tensor in counts.values():
                    out.write(tensor.numpy().tobytes())
                self._handle.seek(0)
                shutil.copyfileobj(self._handle, out, 1 << 24)

        _write(self.path, write, force)

    def close(self) -> None:
        self._handle.close()
        remove_temp(self.spill)

    def __enter__(self) -> MomentSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_calibration(path: str | Path) -> Calibration:
    """The statistics of a file written by `lowrank calibrate` (or Calibrator.save)."""
    from safetensors import SafetensorError, safe_open

    require_file(path, "give the statistics file lowrank calibrate wrote")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if METADATA_KEY not in metadata:
                raise CheckpointError(
                    f"{path}: has no '{METADATA_KEY}' metadata; make calibration statistics with lowrank calibrate"
                )
            payload = json.loads(metadata[METADATA_KEY])
            if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
                version = payload.get("format_version") if isinstance(payload, dict) else payload
                raise CheckpointError(f"{path}: calibration format {version!r} is not supported")
            _check_fields(payload, path)
            where = _tensor_offsets(str(path))
            for key in sorted(set(payload["inputs"].values())):  # checked one at a time, then let go
                _check_moment(_read_tensor(str(path), where, key), key, path)
            counted = {name: handle.get_tensor(key) for name, key in (payload.get("token_counts") or {}).items()}
    except CheckpointError:
        raise
    except SafetensorError as exc:  # not an OSError: a JSON or text file given as STATS lands here
        reason = str(exc).removeprefix("Error while deserializing header: ")
        raise CheckpointError(
            f"{path}: not a safetensors file ({reason}); make calibration statistics with lowrank calibrate"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path}: cannot be read as calibration statistics ({problem})") from None
    for name, counts in counted.items():
        if counts.ndim != 1 or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise CheckpointError(
                f"{path}: token counts of '{name}' are not finite non-negative numbers (V,); rerun lowrank calibrate"
            )
    return Calibration(
        moments=StoredMoments(path, payload["inputs"]),
        tokens=int(payload.get("tokens", 0)),
        text_sha256=payload.get("text_sha256"),
        transposed=set(payload.get("transposed", ())),
        source=str(path),
        sensitivity=_sensitivity(payload.get("sensitivity") or {}, path),
        token_counts=counted,
        fingerprint=_fingerprint(payload.get("fingerprint") or {}, path),
    )


def _check_moment(moment: torch.Tensor, key: str, path: str | Path) -> None:
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise CheckpointError(f"{path}: moment '{key}' has shape {tuple(moment.shape)}, not (n, n)")
    problem = moment_problem(moment)
    if problem is not None:
        raise CheckpointError(f"{path}: moment '{key}' {problem}, so it is no second moment; rerun lowrank calibrate")


def _check_fields(payload: dict, path: str | Path) -> None:
    """The metadata's fields have the types docs/calibration.md gives them (sensitivity: see _sensitivity)."""
    inputs, tokens, digest = payload.get("inputs"), payload.get("tokens", 0), payload.get("text_sha256")
    transposed = payload.get("transposed", [])
    if not (isinstance(inputs, dict) and all(isinstance(v, str) for v in inputs.values())):
        problem = "'inputs' is not a map from weight names to moment keys"
    elif type(tokens) is not int or tokens < 0:
        problem = f"'tokens' is {tokens!r}, not a count of tokens"
    elif digest is not None and not isinstance(digest, str):
        problem = f"'text_sha256' is {digest!r}, not a hash"
    elif not (isinstance(transposed, list) and all(isinstance(name, str) for name in transposed)):
        problem = f"'transposed' is {transposed!r}, not a list of weight names"
    elif not (
        isinstance(counts := payload.get("token_counts", {}), dict) and all(isinstance(v, str) for v in counts.values())
    ):
        problem = "'token_counts' is not a map from weight names to tensor keys"
    elif type(payload.get("probe_tokens", 0)) is not int:
        problem = f"'probe_tokens' is {payload['probe_tokens']!r}, not a count of tokens"
    else:
        return
    raise CheckpointError(f"{path}: its '{METADATA_KEY}' metadata is damaged ({problem}); rerun lowrank calibrate")


def moment_problem(moment: torch.Tensor) -> str | None:
    """What keeps a matrix from being a second moment E[x xᵀ], or None: finite, symmetric, positive semidefinite.

    Both tolerances are n·ε of the moment's dtype, relative to its largest entry (symmetry) and its
    largest eigenvalue (definiteness): the rounding a true moment gets when stored. The eigenvalues
    are computed in float64 on the moment divided by its largest entry, so no value overflows.
    """
    if not bool(torch.isfinite(moment).all()):
        return "holds NaN or Inf"
    n = moment.shape[0]
    peak = float(moment.abs().max()) if moment.numel() else 0.0
    if peak == 0.0:
        return None  # a zero moment: the layer's input was always zero, plain SVD (ops.factoring)
    if not math.isfinite(peak * n * n):
        return f"has entries up to {peak:.3g}, too large to sum in float64"
    tolerance = n * torch.finfo(moment.dtype if moment.is_floating_point() else torch.float32).eps
    c = moment.to(torch.float64).div_(peak)  # one float64 copy (a 1B model's MLP input: 250 MB), worked in place
    if _asymmetry(c) > tolerance:
        return "is not symmetric"
    if float(c.diagonal().min()) < 0:
        return "has a negative diagonal entry (a variance below zero)"
    eigenvalues = torch.linalg.eigvalsh(c)  # ascending; reads the lower triangle, within `tolerance` of (C + Cᵀ)/2
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    if low < -tolerance * max(high, 0.0) or high <= 0:
        return f"is indefinite (eigenvalues from {low * peak:.3g} to {high * peak:.3g})"
    return None


ROWS = 256  # rows of a moment compared with its transpose at a time: no n×n temporary


def _asymmetry(c: torch.Tensor) -> float:
    """max |c − cᵀ|, a band of rows at a time."""
    n = c.shape[0]
    return max((float((c[i : i + ROWS] - c[:, i : i + ROWS].T).abs().max()) for i in range(0, n, ROWS)), default=0.0)


def _sensitivity(values: dict, path: str | Path) -> dict[str, float]:
    if not isinstance(values, dict) or not all(
        isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values.values()
    ):
        raise CheckpointError(f"{path}: its sensitivities are not finite non-negative numbers; rerun lowrank calibrate")
    return {str(name): float(value) for name, value in values.items()}


def _fingerprint(values: dict, path: str | Path) -> dict[str, list[float]]:
    if not isinstance(values, dict) or not all(
        isinstance(v, list) and all(isinstance(x, int | float) and math.isfinite(x) for x in v) for v in values.values()
    ):
        raise CheckpointError(f"{path}: its model fingerprint is not lists of finite numbers; rerun lowrank calibrate")
    return {str(name): [float(x) for x in v] for name, v in values.items()}


# Where a weight is sampled for the fingerprint: fractions of its flattened length.
FINGERPRINT_AT = (0.0, 0.25, 0.5, 0.75, 0.999)
FINGERPRINT_WEIGHTS = 8  # weights sampled, spread over the names in order


def fingerprint_values(tensor: torch.Tensor) -> list[float]:
    """The tensor's values at FINGERPRINT_AT of its flattened length, as floats."""
    flat = tensor.detach().reshape(-1)
    return [float(flat[min(int(at * flat.numel()), flat.numel() - 1)]) for at in FINGERPRINT_AT]


def fingerprint_differs(recorded: list[float], values: list[float], dtype: torch.dtype) -> bool:
    """Whether values are not the recorded ones, allowing a cast to `dtype` (a bfloat16 copy is the same model)."""
    tolerance = 4 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    scale = max((abs(v) for v in recorded), default=0.0)
    return len(recorded) != len(values) or any(
        abs(a - b) > tolerance * max(abs(a), 1e-3 * scale) for a, b in zip(recorded, values, strict=False)
    )


def load_calibration(path: str | Path) -> dict[str, torch.Tensor]:
    """Weight name -> E[x xᵀ] of that weight's input (float32, n×n), from a calibration statistics file.

    Args:
        path: the statistics file `calibrate` (or Calibrator.save) wrote.

    Example:
        >>> moments = lowrank_cli.load_calibration("bert.stats.safetensors")
        >>> moments["encoder.layer.0.attention.self.query.weight"].shape
        torch.Size([768, 768])
    """
    return read_calibration(path).moments
