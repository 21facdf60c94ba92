"""The lowrank file format: factors NAME.B / NAME.A and one `lowrank` metadata key.

    __metadata__["lowrank"] = JSON {
        "format_version": 1,
        "input_metadata": true,   # whether the input had a __metadata__ block at all
        "tensors": {NAME: {"shape": [...], "dtype": "BF16", "rank": r, "rel_error": e,
                           "split": "us", "output_error": e_out}, ...},
        "cast": {NAME: "F32", ...},  # optional: tensors kept whole but stored in another dtype
                                     # (compress --dtype); expand gives them their own dtype back
        "calibration": {"activation_aware": true, "source": "stats.safetensors",
                        "tokens": N, "text_sha256": "…"},   # only with --calibration
        "fidelity": {"target": F, "text_sha256": "…"},      # only with --fidelity: the text that chose the budget
        "heal": {"text_sha256": "…", …}                     # only after heal (model.heal)
    }

With calibration the factors are activation-aware: B = U_r·Σ_r, A = V_rᵀ·S⁻¹ from the SVD of W·S
(docs/calibration.md); "output_error" is then ‖(W − BA)X‖_F / ‖WX‖_F on the calibration inputs.
B·A is W's approximation either way, so expand and every loader read both alike.

split "us": B = U_r·diag(S_r), A = V_rᵀ. split "sqrt": B = U_r·diag(√S_r), A = diag(√S_r)·V_rᵀ,
used when U·S would overflow the factors' dtype (float16); B·A is the same either way.
Every other metadata key is the input's, unchanged. Tensors not listed there are stored
unchanged under their own names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lowrank_cli.errors import CheckpointError
from lowrank_cli.io.dtypes import FLOAT_CODES
from lowrank_cli.io.paths import require_file

if TYPE_CHECKING:
    from lowrank_cli.io.checkpoint import Checkpoint, ShardFile, TensorEntry

METADATA_KEY = "lowrank"
FORMAT_VERSION = 1


def factor_names(name: str) -> tuple[str, str]:
    return f"{name}.B", f"{name}.A"


@dataclass(frozen=True)
class FactorRecord:
    """What expand needs to rebuild one factorized tensor."""

    shape: tuple[int, ...]
    dtype: str
    rank: int
    rel_error: float
    split: str = "us"
    output_error: float | None = None  # activation-aware factors only

    def to_json(self) -> dict:
        fields = {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "rank": self.rank,
            "rel_error": self.rel_error,
            "split": self.split,
        }
        return fields if self.output_error is None else {**fields, "output_error": self.output_error}


def check_factors(source: object, name: str, record: FactorRecord, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """NAME.B (m, r) and NAME.A (r, n) are among `shapes` (factor name -> stored shape) as the record declares.

    Checked on the file's header alone, before any factor is read: the stored factors hold exactly
    r·(m + n) numbers, so a record cannot declare an m×n tensor its factors do not describe.
    """
    rows, cols = record.shape[0], math.prod(record.shape) // record.shape[0]
    b_name, a_name = factor_names(name)
    for factor_name in (b_name, a_name):
        if factor_name not in shapes:
            raise CheckpointError(
                f"{source}: factor '{factor_name}' of tensor '{name}' is missing; compress the original again"
            )
    b, a = tuple(shapes[b_name]), tuple(shapes[a_name])
    if b != (rows, record.rank) or a != (record.rank, cols):
        raise CheckpointError(
            f"{source}: factors of '{name}' have shapes {b} and {a}, not ({rows}, {record.rank}) and"
            f" ({record.rank}, {cols}) as its record {list(record.shape)} says; compress the original again"
        )
    if record.dtype not in FLOAT_CODES:
        raise CheckpointError(
            f"{source}: tensor '{name}' has dtype {record.dtype}, which B·A cannot be (only float tensors are"
            " factorized); compress the original again"
        )


@dataclass(frozen=True)
class ShardRecords:
    """One file of a lowrank checkpoint: its tensors, the input's metadata and the factor records."""

    shard: ShardFile
    entries: list[TensorEntry]
    metadata: dict[str, str] | None  # the input's own metadata (decode_metadata)
    records: dict[str, FactorRecord]


def shard_records(checkpoint: Checkpoint) -> list[ShardRecords]:
    """Every file's factor records, each checked against its own file's header (check_factors) before any
    tensor is read: what expand and every loader read a lowrank checkpoint through."""
    found = []
    for shard, entries in checkpoint.by_shard():
        metadata, records = decode_metadata(shard.path, shard.metadata)
        shapes = {entry.name: entry.shape for entry in entries}
        for name, record in records.items():
            check_factors(shard.path, name, record, shapes)
        found.append(ShardRecords(shard, entries, metadata, records))
    return found


def factor_records(checkpoint: Checkpoint) -> dict[str, FactorRecord]:
    """The factor records of every file of a lowrank checkpoint, checked (shard_records)."""
    return {name: record for shard in shard_records(checkpoint) for name, record in shard.records.items()}


def find_lowrank(path: str | os.PathLike, fix: str) -> tuple[Path, dict] | None:
    """The lowrank file `path` is, or the first safetensors file of the folder `path` that is one, with
    its `lowrank` metadata as JSON ({} when that is no JSON object); None when none is (a dense checkpoint).

    Every place that asks "is this a lowrank file?" before it opens a checkpoint asks here. Each file
    is checked to be a regular file before it is opened (io.paths.require_file: open() on a FIFO
    blocks past SIGINT and SIGTERM), else refused with a CheckpointError ending in `fix`; a file
    safetensors cannot read is passed over, for the loader to say what is wrong with it.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith(".")) if path.is_dir() else [path]
    for file in files:
        require_file(file, fix)
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (OSError, SafetensorError, ValueError, TypeError):  # what safe_open raises for odd files
            continue
        if METADATA_KEY in metadata:
            try:
                payload = json.loads(metadata[METADATA_KEY])
            except (ValueError, RecursionError):
                payload = None
            return file, payload if isinstance(payload, dict) else {}
    return None


def calibration_record(calibration: object | None) -> dict | None:
    """The metadata's note that the factors are activation-aware (an io.calibration.Calibration), or None."""
    if calibration is None:
        return None
    return {
        "activation_aware": True,
        "source": calibration.source,
        "tokens": calibration.tokens,
        "text_sha256": calibration.text_sha256,
    }


def encode_metadata(
    base: dict[str, str] | None,
    records: dict[str, FactorRecord],
    casts: dict[str, str] | None = None,
    calibration: dict | None = None,
    fidelity: dict | None = None,
) -> dict[str, str]:
    payload = {
        "format_version": FORMAT_VERSION,
        "input_metadata": base is not None,
        "tensors": {name: r.to_json() for name, r in records.items()},
    }
    if casts:
        payload["cast"] = casts
    if calibration is not None:
        payload["calibration"] = calibration
    if fidelity is not None:
        payload["fidelity"] = fidelity
    return {**(base or {}), METADATA_KEY: json.dumps(payload, separators=(",", ":"))}


def decode_metadata(
    source: object, metadata: dict[str, str] | None
) -> tuple[dict[str, str] | None, dict[str, FactorRecord]]:
    """Split a lowrank file's metadata into the original metadata and the factor records."""
    if not metadata or METADATA_KEY not in metadata:
        raise CheckpointError(f"{source}: has no '{METADATA_KEY}' metadata; it was not written by lowrank compress")
    try:
        payload = json.loads(metadata[METADATA_KEY])
        version = payload["format_version"]
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{source}: lowrank format version {version!r} is not supported; upgrade lowrank")
        had_metadata = payload.get("input_metadata", True)
        records = {name: _record(r) for name, r in payload["tensors"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(
            f"{source}: its '{METADATA_KEY}' metadata is damaged ({type(exc).__name__}: {exc});"
            " compress the original again"
        ) from None
    original = {key: value for key, value in metadata.items() if key != METADATA_KEY}
    return original if had_metadata or original else None, records


def decode_casts(source: object, metadata: dict[str, str]) -> dict[str, str]:
    """The original dtype code of each tensor compress cast to --dtype (none in older files)."""
    try:
        casts = json.loads(metadata[METADATA_KEY]).get("cast", {})
        if not (isinstance(casts, dict) and all(isinstance(v, str) for v in casts.values())):
            raise TypeError(f"cast {casts!r} is not a map from names to dtype codes")
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(
            f"{source}: its '{METADATA_KEY}' metadata is damaged ({type(exc).__name__}: {exc});"
            " compress the original again"
        ) from None
    return casts


def _record(raw: dict) -> FactorRecord:
    """One tensor's entry, checked: expand trusts nothing that a damaged file could say."""
    shape, dtype, rank, error, split = raw["shape"], raw["dtype"], raw["rank"], raw["rel_error"], raw.get("split", "us")
    if not (isinstance(shape, list) and len(shape) >= 2 and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"shape {shape!r} is not a list of two or more sizes")
    if shape[0] == 0 or type(rank) is not int or rank < 0:
        raise ValueError(f"shape {shape!r} with rank {rank!r} describes no factorized matrix")
    if not isinstance(error, (int, float)) or isinstance(error, bool) or not 0 <= error < float("inf"):
        raise ValueError(f"rel_error {error!r} is not a finite number ≥ 0")
    if not isinstance(dtype, str) or split not in ("us", "sqrt"):
        raise ValueError(f"dtype {dtype!r} or split {split!r} is not valid")
    return FactorRecord(tuple(shape), dtype, rank, float(error), split)
