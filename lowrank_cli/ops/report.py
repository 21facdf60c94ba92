"""Plain dataclasses the library returns; the JSON output is exactly their fields.

`SCHEMA_VERSION` is the version of that JSON document (docs/json.md): it grows by one whenever
a field changes meaning or goes away; new fields may appear without a change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

SCHEMA_VERSION = 2


class Status(str, Enum):
    """What a command did with one tensor."""

    analyzed = "analyzed"  # analyze: spectrum read, no policy applied
    factorized = "factorized"  # compress (analyze with a policy: would be) stored as factors B·A (--diff: a LoRA pair)
    dense = "dense"  # a policy applied, but factors would not save params: kept as it is
    skipped = "skipped"  # not a float matrix, not selected, or (extract) not in the adapter
    extracted = "extracted"  # extract: written as a LoRA pair
    carried = "carried"  # extract: beside the LoRA pairs, as its change (lora_bias) or whole (modules_to_save)
    expanded = "expanded"  # expand: rebuilt from its factors
    copied = "copied"  # expand: stored unchanged in the lowrank file, copied (resize: a pair left as it is)
    healed = "healed"  # heal: factors trained toward the reference model
    resized = "resized"  # resize: a LoRA pair truncated to a new rank


@dataclass
class TensorReport:
    """One tensor: what it is, what its spectrum says and what was done with it."""

    name: str
    shape: list[int]
    dtype: str
    params: int
    status: Status
    reason: str | None = None
    rank: int | None = None  # the rank kept (or that a policy would keep)
    rank_before: int | None = None  # resize: the adapter's rank of the module before
    numerical_rank: int | None = None
    stable_rank: float | None = None
    rank_90: int | None = None  # ranks that keep 90 / 99 / 99.9 % of Σσ²
    rank_99: int | None = None
    rank_999: int | None = None
    rel_error: float | None = None  # ‖W − B·A‖_F / ‖W‖_F (extract: of ΔW)
    output_error: float | None = None  # with calibration: ‖(W − B·A)X‖_F / ‖WX‖_F over the calibration inputs
    kept: float | None = None  # extract: share of ‖ΔW‖_F² the adapter carries, 1 − rel_error²
    params_after: int | None = None
    sparkline: str | None = None
    # analyze: the power law fitted to the eigenvalues λ = σ² of WᵀW (docs/analyze-metrics.md)
    alpha: float | None = None  # p(λ) ∝ λ^(−alpha) above the cut-off the KS distance chose; null: no fit
    alpha_tail: int | None = None  # how many eigenvalues the fit used (those ≥ its cut-off)
    ks_distance: float | None = None  # KS distance between that law and those eigenvalues
    log_spectral_norm: float | None = None  # log10 λ_max = log10 σ_max²
    alpha_weighted: float | None = None  # alpha · log_spectral_norm
    singular_values: list[float] | None = None  # analyze: σ_1 ≥ σ_2 ≥ … of W (or the first --top)
    method: str | None = None  # "exact" | "randomized": how the factors were computed
    split: str | None = None  # "us" (B = U·S) or "sqrt" (√S on each side, when U·S overflows)
    file: str | None = None  # the file (or shard) that holds the tensor


@dataclass
class Totals:
    params: int = 0
    params_after: int = 0
    savings: float = 0.0  # 1 − params_after / params
    bytes: int | None = None
    bytes_after: int | None = None
    max_rel_error: float | None = None
    max_output_error: float | None = None

    @classmethod
    def of(cls, tensors: list[TensorReport], nbytes: int | None = None, nbytes_after: int | None = None) -> Totals:
        params = sum(t.params for t in tensors)
        after = sum(t.params if t.params_after is None else t.params_after for t in tensors)
        errors = [t.rel_error for t in tensors if t.rel_error is not None]
        outputs = [t.output_error for t in tensors if t.output_error is not None]
        return cls(
            params=params,
            params_after=after,
            savings=1.0 - after / params if params else 0.0,
            bytes=nbytes,
            bytes_after=nbytes_after,
            max_rel_error=max(errors) if errors else None,
            max_output_error=max(outputs) if outputs else None,
        )


@dataclass
class Report:
    """The result of one command on one checkpoint."""

    command: str
    sources: list[str]
    tensors: list[TensorReport]
    totals: Totals
    policy: dict | None = None
    output: str | None = None
    options: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def combine(cls, reports: list[Report]) -> Report:
        """Several checkpoints' reports as one (analyze with several PATHs)."""
        tensors = [t for r in reports for t in r.tensors]
        return cls(
            command=reports[0].command,
            sources=[s for r in reports for s in r.sources],
            tensors=tensors,
            totals=Totals.of(tensors),
            policy=reports[0].policy,
            options=reports[0].options,
        )

    @property
    def notes(self) -> list[str]:
        """What the caller should know beyond the rows: temporaries of killed runs removed, how a text
        was split, a budget that could not weigh sensitivities, …; the CLI prints them on stderr."""
        return self.options.get("notes", [])

    def exceeds(self, max_error: float) -> list[TensorReport]:
        """Tensors whose error is above max_error (the --fail-above gate): the output error when calibrated."""
        return [t for t in self.tensors if (_gated(t) or 0.0) > max_error]

    def to_dict(self) -> dict:
        """The JSON document: every field, statuses as their string values."""
        return asdict(self, dict_factory=_plain)


def _gated(tensor: TensorReport) -> float | None:
    return tensor.output_error if tensor.output_error is not None else tensor.rel_error


def _plain(items: list[tuple[str, object]]) -> dict:
    return {key: value.value if isinstance(value, Enum) else value for key, value in items}
