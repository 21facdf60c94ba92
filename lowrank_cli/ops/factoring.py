"""Factoring one tensor: read its matrix, decide its rank, factor it, measure and record what is stored.

Every command that reads spectra or writes factors goes through here, so one tensor is treated
the same way by all of them: analyze and the budget read spectra (`spectrum_of`, `whitened_view`);
compress and extract factor a checkpoint's tensor with its calibration statistics, if any
(`factor_tensor`); resize factors a matrix of its own (`factor_matrix`); the public
`factorize` and `LowRankLinear.from_linear` factor a caller's matrix (`factor_weight`). Each
gives factors in the stored dtype with the error measured on them, and a report row records the
outcome (`new_report`, `record`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowrank_cli.errors import CheckpointError, TensorError, arg
from lowrank_cli.io.calibration import Calibration
from lowrank_cli.io.checkpoint import Checkpoint, TensorEntry
from lowrank_cli.io.dtypes import compute_dtype, torch_dtype
from lowrank_cli.linalg.factorize import Factorization, finite, generator_for, relative_error, truncated_svd
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.spectrum import SPEED_SHARE, Spectrum, break_even_rank, singular_values
from lowrank_cli.linalg.whiten import RowWeights, Whitener
from lowrank_cli.linalg.whiten import whitener as make_whitener
from lowrank_cli.ops.report import Status, TensorReport
from lowrank_cli.ops.settings import DType, Method, Settings

# --dtype names, as safetensors codes.
STORED_CODES = {DType.float32: "F32", DType.float16: "F16", DType.bfloat16: "BF16", DType.float64: "F64"}


def skip_reason(entry: TensorEntry, selected: bool = True) -> str | None:
    """Why a tensor is copied unchanged instead of factorized, or None for a float matrix."""
    if not selected:
        return "not selected (include/exclude)"
    if not entry.is_known:
        return f"{entry.dtype}, a dtype lowrank copies but does not compute in"
    if not entry.is_float:
        return f"{entry.dtype}, not floating point"
    if len(entry.shape) < 2:
        return f"{len(entry.shape)}-D, not a matrix"
    if entry.numel == 0:
        return "empty tensor"
    return None


def new_report(entry: TensorEntry, status: Status, reason: str | None = None) -> TensorReport:
    """A row for the tensor; until a rank is decided it keeps all its params."""
    return TensorReport(
        name=entry.name,
        shape=list(entry.shape),
        dtype=entry.dtype,
        params=entry.numel,
        status=status,
        reason=reason,
        params_after=entry.numel,
        file=str(entry.path),
    )


def load_matrix(checkpoint: Checkpoint, entry: TensorEntry, device: str = "cpu") -> torch.Tensor:
    """The tensor as an (out, in·…) matrix in its computation dtype, checked for NaN and Inf."""
    matrix = checkpoint.read_matrix(entry.name, compute_dtype(entry.dtype), device)
    check_finite(matrix, f"{entry.path}: tensor '{entry.name}'", entry.name)
    return matrix


def check_finite(matrix: torch.Tensor, where: str, name: str) -> None:
    if not finite(matrix):
        bad = "NaN" if bool(torch.isnan(matrix).any()) else "Inf"
        fix = f"repair the checkpoint or leave it out with {arg('exclude')} '{name}'"
        raise TensorError(f"{where} contains {bad}; {fix}")


def spectrum_of(matrix: torch.Tensor, rtol: float | None = None) -> Spectrum:
    values, scale = singular_values(matrix, rtol=rtol)
    return Spectrum.of(values, tuple(matrix.shape), matrix.dtype, scale)


def describe_spectrum(report: TensorReport, spectrum: Spectrum, rtol: float | None = None) -> None:
    """Fill in the spectrum's own numbers: numerical and stable rank, energy ranks, sparkline."""
    report.numerical_rank = spectrum.numerical_rank(rtol)
    report.stable_rank = spectrum.stable_rank
    report.rank_90, report.rank_99, report.rank_999 = (spectrum.rank_for_energy(f) for f in (0.9, 0.99, 0.999))
    report.sparkline = spectrum.sparkline()


def apply_policy(report: TensorReport, spectrum: Spectrum, policy: RankPolicy, limit: int | None = None) -> None:
    """What the policy would do (analyze), with the optimal (Eckart–Young) error at its rank.

    Factors up to rank `limit`: by default the break-even rank, as compress; min(m, n) for an adapter, as extract.
    """
    rank = policy.choose(spectrum)
    decision = decide(rank, spectrum.shape, policy, break_even_rank(*spectrum.shape) if limit is None else limit)
    described = report.reason  # what the spectrum's row already says (plain SVD, left out by extract)
    _record_decision(report, decision)
    if described:
        report.reason = f"{report.reason}; {described}" if report.reason else described
    if decision.status == Status.factorized:
        report.rel_error = spectrum.relative_error(rank)
        report.params_after = rank * sum(spectrum.shape)


@dataclass(frozen=True)
class Decision:
    status: Status  # factorized or dense
    rank: int | None
    reason: str | None = None


KEPT_WHOLE = "the budget keeps it whole"


def decide(rank: int | None, shape: tuple[int, int], policy: RankPolicy, limit: int) -> Decision:
    """Factorized up to rank `limit`; dense (with the reason) above it, for a zero matrix, rank None, policy dense."""
    m, n = shape
    if policy.dense:
        return Decision(Status.dense, None, KEPT_WHOLE)
    faster = limit < break_even_rank(m, n)  # compress --objective speed: limit is speed_rank
    if rank is None:
        stop = "being faster" if faster else "saving params"
        return Decision(Status.dense, None, f"the target needs rank > {limit}, where factors stop {stop}")
    if rank == 0:
        return Decision(Status.dense, 0, "zero matrix")
    if rank > limit:
        clamp = f"rank {policy.rank} clamped to min(m, n); " if policy.rank and policy.rank > rank else ""
        if faster and rank * (m + n) < m * n:
            share = f"{rank * (m + n):,} of {m * n:,} params, more than {SPEED_SHARE:.0%}"
            return Decision(Status.dense, rank, f"{clamp}rank {rank} keeps {share}: factors would run hardly faster")
        return Decision(Status.dense, rank, f"{clamp}rank {rank} needs {rank * (m + n):,} ≥ {m * n:,} params")
    return Decision(Status.factorized, rank)


@dataclass
class Factors:
    """The outcome of one matrix: factors B (m, r), A (r, n) in the stored dtype, or none (dense)."""

    decision: Decision
    method: str | None  # None when nothing was factorized (a dense policy)
    spectrum: Spectrum | None = None  # all singular values, when the method computed them
    b: torch.Tensor | None = None
    a: torch.Tensor | None = None
    split: str | None = None  # "us" or "sqrt" (io.fileformat)
    rel_error: float = 0.0  # ‖W − B·A‖_F / ‖W‖_F measured on b and a as stored; 0 when dense
    output_error: float | None = None  # with calibration: ‖(W − B·A)X‖_F / ‖WX‖_F, measured likewise
    note: str | None = None  # why calibration was given but not used for this tensor


def factor_matrix(
    matrix: torch.Tensor,
    policy: RankPolicy,
    settings: Settings,
    *,
    name: str,
    stored: torch.dtype,
    limit: int | None = None,
    where: str | None = None,
    method: Method | None = None,
    whitener: Whitener | RowWeights | None = None,
) -> Factors:
    """Factor one float32/float64 matrix by `policy`, storing in `stored`, the error measured on what is stored.

    limit: the highest rank worth storing (default: the break-even rank; extract allows min(m, n)).
    whitener: the layer input's statistics (linalg.whiten); then W·S is factorized, A un-whitened,
    and the policy's error means the output error ‖(W − BA)X‖_F / ‖WX‖_F, measured on what is stored.
    A randomized result that misses an error target by floating-point bookkeeping is redone exactly; one
    that still misses it as stored gets more terms, or stays dense: a factorized tensor always meets it.
    """
    limit = break_even_rank(*matrix.shape) if limit is None else limit
    if policy.dense:  # nothing to compute: the budget keeps the tensor whole
        return Factors(decide(None, tuple(matrix.shape), policy, limit), method=None)
    method = method or settings.method
    generator = generator_for(name, settings.seed, matrix.device)
    target_matrix = matrix if whitener is None else whitener.whiten(matrix)
    result = truncated_svd(target_matrix, policy, method=method.value, generator=generator, max_rank=limit)
    decision = decide(result.rank, tuple(matrix.shape), policy, limit)
    outcome = Factors(decision, result.method, result.spectrum)
    if decision.status != Status.factorized:
        return outcome
    outcome.b, outcome.a, outcome.split = _stored_factors(result, stored, whitener, matrix.dtype, where or name)
    outcome.rel_error, outcome.output_error = _measure(matrix, outcome.b, outcome.a, whitener)
    target = policy.error_target()
    missed = target is not None and _measured(outcome) > target
    if result.method == "randomized" and stored == matrix.dtype and missed:
        again = dict(settings=settings, name=name, stored=stored, limit=limit, where=where, whitener=whitener)
        return factor_matrix(matrix, policy, method=Method.exact, **again)
    if missed and policy.max_error is not None:  # --energy is a share of the spectrum, kept as computed
        # The rank was read off the spectrum of what was computed, not of what is stored: rounding the factors
        # to a narrower dtype, or (with calibration) the damping λ, adds error the spectrum cannot see.
        return _more_terms(matrix, target_matrix, outcome, target, stored, whitener, limit, where or name)
    return outcome


def _stored_factors(
    result: Factorization, stored: torch.dtype, whitener: Whitener | RowWeights | None, compute: torch.dtype, where: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """B and A in the stored dtype (A un-whitened: A = V_rᵀ·S⁻¹), refused if they overflow it."""
    if whitener is None:
        b, a, split = result.factors(stored)
    else:
        b, a, split = result.factors(compute)
        b, a = whitener.unwhiten_factors(b, a)  # A = V_rᵀ·S⁻¹ (a Linear), or B = D^-½·U_r·Σ_r (an embedding)
        b, a = b.to(stored), a.to(stored)
    if not (finite(b) and finite(a)):
        wider = "bfloat16 or float32" if stored == torch.float16 else "float64"
        raise TensorError(
            f"{where}: its factors overflow {stored} even split as U·√S and √S·Vᵀ; use {arg('dtype')} {wider}"
        )
    return b, a, split


def _measure(
    matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor, whitener: Whitener | RowWeights | None
) -> tuple[float, float | None]:
    """The weight error and (with calibration) the output error of the factors as stored."""
    output = None if whitener is None else whitener.output_error(matrix, b, a)
    return relative_error(matrix, b, a), output


def _measured(outcome: Factors) -> float:
    """The error the policy's target bounds: the output error with calibration, else the weight error."""
    return outcome.rel_error if outcome.output_error is None else outcome.output_error


def _more_terms(
    matrix: torch.Tensor,
    target_matrix: torch.Tensor,
    outcome: Factors,
    target: float,
    stored: torch.dtype,
    whitener: Whitener | RowWeights | None,
    limit: int,
    where: str,
) -> Factors:
    """The smallest rank found up to `limit` whose stored factors meet `target`; dense when none does.

    One exact SVD to `limit` terms; ranks above the first are tried one more, then doubling the step,
    then bisecting, each measured on the factors as stored.
    """
    full = truncated_svd(target_matrix, RankPolicy(rank=limit), method="exact")

    def attempt(rank: int) -> Factors:
        cut = replace(full, rank=rank, u=full.u[:, :rank], s=full.s[:rank], vh=full.vh[:rank])
        tried = Factors(Decision(Status.factorized, rank), "exact", outcome.spectrum)
        tried.b, tried.a, tried.split = _stored_factors(cut, stored, whitener, matrix.dtype, where)
        tried.rel_error, tried.output_error = _measure(matrix, tried.b, tried.a, whitener)
        return tried

    low, step, best = outcome.decision.rank, 1, None  # low: a rank known to miss
    while best is None and low < limit:
        tried = attempt(min(low + step, limit))
        if _measured(tried) <= target:
            best = tried
        else:
            low, step = tried.decision.rank, step * 2
    if best is None:
        what = "output error" if whitener is not None else "error"
        dtype = str(stored).removeprefix("torch.")
        reason = f"factors stored in {dtype} miss the {what} target {target:g} at every rank up to {limit}"
        return Factors(Decision(Status.dense, None, reason), "exact", outcome.spectrum)
    high = best.decision.rank
    while high - low > 1:
        tried = attempt((low + high) // 2)
        if _measured(tried) <= target:
            best, high = tried, tried.decision.rank
        else:
            low = tried.decision.rank
    return best


NO_STATISTICS = "no calibration statistics for this tensor: plain SVD"
NO_LOOKUPS = "the calibration text looked up none of its rows: plain SVD"
ZERO_MOMENT = "its input's second moment is zero: plain SVD"


def factor_tensor(
    matrix: torch.Tensor,
    policy: RankPolicy,
    settings: Settings,
    calibration: Calibration | None,
    *,
    name: str,
    stored: torch.dtype,
    limit: int | None = None,
    where: str | None = None,
) -> Factors:
    """Factor a checkpoint's tensor `name`: `factor_matrix` under its calibration statistics, if any.

    With calibration, W·S is factorized for a layer with an input moment (Wᵀ·S for one stored
    (in, out), GPT-2's Conv1D: then B = A′ᵀ and A = B′ᵀ of Wᵀ ≈ B′·A′), D^½·W for an embedding with
    lookup counts, and W by plain SVD, with a note saying why, for a tensor with neither.
    """
    options = dict(name=name, stored=stored, limit=limit, where=where)
    if calibration is None:
        return factor_matrix(matrix, policy, settings, **options)
    whitener, transposed, note = _statistics(matrix, calibration, name, where or name)
    if whitener is None:
        return replace(factor_matrix(matrix, policy, settings, **options), note=note)
    if not transposed:
        return factor_matrix(matrix, policy, settings, whitener=whitener, **options)
    outcome = factor_matrix(matrix.T.contiguous(), policy, settings, whitener=whitener, **options)
    if outcome.b is not None:  # Wᵀ ≈ B′·A′, so W ≈ A′ᵀ·B′ᵀ
        outcome.b, outcome.a = outcome.a.T.contiguous(), outcome.b.T.contiguous()
    return outcome


def whitened_view(matrix: torch.Tensor, calibration: Calibration | None, name: str) -> torch.Tensor:
    """The matrix whose spectrum the policy reads: W·S with calibration (Wᵀ·S for a transposed layer), else W."""
    if calibration is None:
        return matrix
    whitener, transposed, _ = _statistics(matrix, calibration, name, name)
    if transposed:
        matrix = matrix.T
    return matrix if whitener is None else whitener.whiten(matrix)


def _statistics(
    matrix: torch.Tensor, calibration: Calibration, name: str, where: str
) -> tuple[Whitener | RowWeights | None, bool, str | None]:
    """What `name` is factorized under: (whitener or row weights, whether its moment is of Wᵀ's inputs,
    the note saying why there is none)."""
    moment = calibration.moment_for(name)
    if moment is None:
        counts = calibration.token_counts.get(name)
        if counts is None:
            return None, False, NO_STATISTICS
        rows = _row_weights(counts, matrix.shape[0], where)
        return rows, False, None if rows is not None else NO_LOOKUPS
    transposed = name in calibration.transposed
    _check_moment(moment, matrix.shape[0] if transposed else matrix.shape[1], where)
    whitener = make_whitener(moment.to(matrix.device))
    return whitener, transposed, None if whitener is not None else ZERO_MOMENT


def factor_weight(weight: torch.Tensor, policy: RankPolicy, settings: Settings, *, where: str) -> Factors:
    """Factor a caller's own matrix (not a checkpoint's) at any rank up to min(m, n), in its dtype.

    The maths runs in float32 (float64 for a float64 weight); NaN or Inf is refused naming `where`.
    """
    matrix = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    check_finite(matrix, where, where)
    return factor_matrix(matrix, policy, settings, name="", stored=weight.dtype, limit=min(matrix.shape), where=where)


def stored_dtype(settings: Settings, code: str) -> torch.dtype:
    """The dtype factors are stored in: the tensor's own (code) or the one settings ask for."""
    return torch_dtype(code if settings.dtype == DType.keep else STORED_CODES[settings.dtype])


def cast_dense(tensor: torch.Tensor, stored: torch.dtype, where: str) -> tuple[torch.Tensor, float | None]:
    """A tensor kept whole, in the stored dtype, with ‖W − cast(W)‖_F / ‖W‖_F (None when W itself is not finite)."""
    cast = tensor.to(stored)
    if not bool(torch.isfinite(tensor).all()):
        return cast, None
    if not bool(torch.isfinite(cast).all()):
        raise TensorError(f"{where}: its values overflow {stored}; use {arg('dtype')} bfloat16 or float32")
    w = tensor.to(torch.float64)
    norm = float(torch.linalg.vector_norm(w))
    return cast, float(torch.linalg.vector_norm(w - cast.to(torch.float64))) / norm if norm else 0.0


def record(report: TensorReport, outcome: Factors, rtol: float | None = None) -> None:
    """Write a factor step's outcome into the tensor's report row."""
    report.method = outcome.method
    if outcome.spectrum is not None:
        describe_spectrum(report, outcome.spectrum, rtol)
    _record_decision(report, outcome.decision)
    if outcome.note and outcome.method is not None:  # a tensor kept whole had no SVD, plain or not
        report.reason = f"{report.reason}; {outcome.note}" if report.reason else outcome.note
    if outcome.decision.status == Status.factorized:
        report.rel_error = outcome.rel_error
        report.output_error = outcome.output_error
        report.split = outcome.split
        report.params_after = outcome.b.numel() + outcome.a.numel()


def _record_decision(report: TensorReport, decision: Decision) -> None:
    """Status, rank and reason; a dense tensor keeps its params at error 0, factors' are filled in after."""
    report.status, report.rank, report.reason = decision.status, decision.rank, decision.reason
    report.rel_error = 0.0 if decision.status == Status.dense else None
    report.params_after = report.params


def _row_weights(counts: torch.Tensor, rows: int, where: str) -> RowWeights | None:
    if tuple(counts.shape) != (rows,):
        raise TensorError(
            f"{where}: its calibration token counts are {tuple(counts.shape)}, but the table has {rows} rows;"
            " the statistics are of another model, run lowrank calibrate on this one"
        )
    return RowWeights.of_counts(counts)


def _check_moment(moment: torch.Tensor, inputs: int, where: str) -> None:
    if tuple(moment.shape) != (inputs, inputs):  # the statistics file is the wrong input, as in api._calibration
        raise CheckpointError(
            f"{where}: its calibration moment is {tuple(moment.shape)}, but the tensor has {inputs} inputs;"
            " the statistics are of another model, run lowrank calibrate on this one"
        )
