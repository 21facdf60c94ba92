"""Randomized truncated SVD (Halko, Martinsson & Tropp 2011), fixed-rank and adaptive.

Work is O(m·n·k) for a basis of k columns instead of the O(m·n·min(m, n)) of a full SVD.
The adaptive form (the blocked randQB of Yu, Gu & Li 2018) grows an orthonormal basis Q
until the residual, known exactly as ‖W − QQᵀW‖_F² = ‖W‖_F² − ‖QᵀW‖_F², meets the target.

Products that only steer the basis (the sketch WΩ and the power iterations) may run in a
lower `sketch` precision: bfloat16 where the CPU's AMX tile units multiply it (fast_bfloat16). Rounding
there only tilts the basis by ~2⁻⁸, and the last product that forms the basis and B = QᵀW are
always in the matrix's own dtype, so residuals, singular values and errors are as exact as before.
"""

from __future__ import annotations

import functools
import os

import torch

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
CHUNK_BYTES = 16 << 20  # row blocks of reductions and residuals: no W-sized temporary
_FLOAT32_EPS = torch.finfo(torch.float32).eps


def orthonormal(y: torch.Tensor, *, twice: bool = True) -> torch.Tensor:
    """An orthonormal basis of y's columns (m, k), by CholeskyQR, or Householder QR where that is unsafe.

    CholeskyQR (QR from the Cholesky factor of yᵀy) is all matrix products, where Householder QR
    factors y panel by panel, column by column inside each (benchmarks/bench_kernels.py times both
    on tall y). Once is enough for a basis that only feeds the next power iteration;
    twice (CholeskyQR2, Fukaya et al. 2014) is orthonormal to rounding like Householder, as long
    as y's condition number is below ~1/√ε, which the checks below make sure of.
    """
    if y.shape[1] == 0:
        return y
    r, info = torch.linalg.cholesky_ex(y.T @ y, upper=True)  # (k, m) @ (m, k) -> (k, k) = rᵀr
    diagonal = r.diagonal()
    # κ(y) ≳ max/min of r's diagonal. Past ~1/(10√ε) (ε of float32 even for float64, whose Cholesky
    # can succeed on far worse y) one pass leaves QᵀQ visibly off the identity: Householder instead.
    if info == 0 and float(diagonal.min()) > 10 * _FLOAT32_EPS**0.5 * float(diagonal.max()):
        q = torch.linalg.solve_triangular(r, y, upper=True, left=False)  # y·r⁻¹, (m, k)
        gram = q.T @ q  # (k, k): the identity, up to the first pass's rounding (~κ(y)²·ε)
        # r's diagonal can understate κ(y) (seen: 1000×7 float32 at κ 4.7e3 gave ‖QᵀQ − I‖ = 0.79), so the
        # pass is checked: one pass that is near enough feeds a power iteration; else a second pass.
        off = float((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max())
        if not twice and off < 0.5 / gram.shape[0]:  # max entry < 0.5/k bounds ‖QᵀQ − I‖₂ < 0.5
            return q
        if off < 0.5:
            r, info = torch.linalg.cholesky_ex(gram, upper=True)
            if info == 0:
                return torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return torch.linalg.qr(y).Q


def sum_of_squares(x: torch.Tensor) -> float:
    """Σx², each row's dot product with itself in x's dtype and the row sums in float64, in row chunks.

    On an 11008×4096 float32 matrix, one float32 reduction over all entries is off by 1e-4 (dot) to
    6e-3 (vector_norm) of the float64 sum; this is within 2e-8, reading x once in its own dtype without
    a float64 copy (benchmarks/bench_kernels.py times it beside the float64 norm).
    vecdot reads each chunk once, without the x*x temporary of (x*x).sum(-1), to the same digits.
    """
    rows = max(1, CHUNK_BYTES // (x.element_size() * max(1, x.shape[-1])))
    total = 0.0
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        total += float(torch.linalg.vecdot(chunk, chunk).to(torch.float64).sum())
    return total


def fast_bfloat16(device_type: str) -> bool:
    """Whether the sketch's matrix products run in bfloat16 here: on CPUs with Intel AMX, whose tile
    units multiply bfloat16 matrices (docs/performance-amx.md has the figures).

    Without AMX the rule keeps float32: bfloat16 products then run on the vector units (through
    float32 conversions where the CPU has no bfloat16 instructions) and were measured slower than
    float32 when the rule was set; a cap below AMX (ONEDNN_MAX_CPU_ISA) turns the bfloat16 sketch
    off too. benchmarks/bench_kernels.py times both on the CPU at hand. CUDA keeps float32: the GPU
    path has not been measured with a bfloat16 sketch.
    """
    if device_type != "cpu":
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return (cap in ("ALL", "DEFAULT") or "AMX" in cap) and _has_amx()


@functools.cache
def _has_amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _low(matrix: torch.Tensor, sketch: torch.dtype | None) -> torch.Tensor:
    return matrix if sketch in (None, matrix.dtype) else matrix.to(sketch)


def _times(low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """low @ x in low's precision, returned in x's dtype."""
    return (low @ x.to(low.dtype)).to(x.dtype)


def _times_t(low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """lowᵀ @ x as (xᵀ @ low)ᵀ: W is read in its stored layout, not as a transposed view, which
    bfloat16 kernels were measured slower on (benchmarks/bench_kernels.py times both)."""
    return (x.T.to(low.dtype, memory_format=torch.contiguous_format) @ low).T.to(x.dtype)


def _svd_wide(b: torch.Tensor) -> Triple:
    """SVD of a wide k×n matrix through the QR of bᵀ and the SVD of the k×k factor, measured faster
    than svd(b) (benchmarks/bench_kernels.py times both)."""
    q, r = torch.linalg.qr(b.T)  # (n, k), (k, k): b = rᵀ·qᵀ
    u, s, vh_r = torch.linalg.svd(r.T)  # rᵀ = u·diag(s)·vh_r
    return u, s, vh_r @ q.T  # (k, k) @ (k, n) -> (k, n)


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int,
    power_iters: int,
    generator: torch.Generator,
    sketch: torch.dtype | None = None,
    tolerance: float | None = None,
    total: float | None = None,
) -> Triple:
    """The leading `rank` singular triplets of an m×n matrix: U (m, r), S (r,), Vh (r, n).

    With a `tolerance`, power_iters is a maximum (see power_range), and the triplets are those of
    W·Z·Zᵀ = Y·Zᵀ, whose error the stop rule watched, so no further pass over W is needed.
    `total` is ‖W‖_F², if the caller has it.
    """
    m, n = matrix.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device=generator.device).to(matrix.device, matrix.dtype)
    y, z, _ = power_range(matrix, omega, rank, power_iters=power_iters, sketch=sketch, tolerance=tolerance, total=total)
    if tolerance is not None:
        u, s, vh_y = torch.linalg.svd(y, full_matrices=False)  # y = W·Z (m, k): u (m, k), vh_y (k, k)
        return u[:, :rank], s[:rank], (vh_y @ z.T)[:rank]  # (k, k) @ (k, n) -> (k, n)
    q = orthonormal(y)
    small = q.T @ matrix  # (k, m) @ (m, n) -> (k, n)
    u_small, s, vh = _svd_wide(small)
    u = q @ u_small  # (m, k) @ (k, k) -> (m, k)
    return u[:, :rank], s[:rank], vh[:rank]


def power_range(
    matrix: torch.Tensor,
    omega: torch.Tensor,
    rank: int,
    *,
    power_iters: int,
    sketch: torch.dtype | None = None,
    tolerance: float | None = None,
    total: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Y = W·Z (m, k) for Z (n, k) the range of (WᵀW)^q·Ω, whose range holds W's leading directions.

    Returns Y, Z (None when q = 0 and Ω itself was used) and the q it took. Without a tolerance
    q = power_iters. With one, Z is orthonormal and q stops early once an iteration raised
    c = Σ_{i≤rank} σ_i(W·Z)², the energy the rank-`rank` truncation of W·Z·Zᵀ keeps (its squared
    error is exactly ‖W‖² − c), by no more than tolerance·(‖W‖² − c), a share of the error² left.
    Where each iteration at least halves what is left to gain (on σ_i ∝ i^-0.5 it keeps 0.14-0.3
    of it), what more iterations could add is below that last step, so the squared error is within
    1 + tolerance of theirs. Spectra that decay fast or not at all stop after one or two; slow ones
    take more.
    """
    low = _low(matrix, sketch)
    if tolerance is None or power_iters == 0:
        y, z = _times(low if power_iters else matrix, omega), None  # (m, n) @ (n, k) -> (m, k)
        for i in range(power_iters):  # sharpen the decay: the range of (WWᵀ)^q W
            z = orthonormal(_times_t(low, orthonormal(y, twice=False)), twice=False)  # (n, k)
            y = _times(matrix if i == power_iters - 1 else low, z)  # (m, k), the last one in full precision
        return y, z, power_iters
    total = sum_of_squares(matrix) if total is None else total
    # c is only known to rounding: a few ε·‖W‖² (2ε measured on float32 2048²); moves below that are noise.
    floor = 16 * torch.finfo(matrix.dtype).eps * total
    z = orthonormal(omega)  # orthonormal from the start, so W·Z's σ bound W's from below
    y = _times(low, z)
    captured = _captured(y, rank)
    for i in range(1, power_iters + 1):
        z = orthonormal(_times_t(low, orthonormal(y, twice=False)))  # (n, k), orthonormal to rounding
        last = i == power_iters
        y = _times(matrix if last else low, z)  # (m, k)
        before, captured = captured, _captured(y, rank)
        if last or abs(captured - before) <= tolerance * (total - captured) + floor:
            if not last and low is not matrix:
                y = matrix @ z  # the factors themselves come from the full-precision product
            return y, z, i
    return y, z, power_iters


def _captured(y: torch.Tensor, rank: int) -> float:
    """Σ of the `rank` largest σ(y)², from y's (k, k) Gram matrix in float64: a few ms beside W·Z."""
    return float(torch.linalg.eigvalsh((y.T @ y).to(torch.float64))[-rank:].sum())  # (k, m) @ (m, k)


def adaptive_range(
    matrix: torch.Tensor,
    target_sq: float,
    *,
    block: int,
    power_iters: int,
    max_rank: int,
    generator: torch.Generator,
    refinements: int = 1,
    total: float | None = None,
    sketch: torch.dtype | None = None,
) -> tuple[Triple, float] | None:
    """Grow Q in blocks until ‖W − QQᵀW‖_F² ≤ target_sq; then the SVD of QᵀW.

    `total` is ‖W‖_F², if the caller has it. Returns (U, S, Vh) of QQᵀW with its k = Q's width
    singular values, and the residual ‖W − QQᵀW‖_F² (float64), or None once k would pass
    max_rank without meeting the target.
    """
    m, n = matrix.shape
    total = sum_of_squares(matrix) if total is None else total
    residual = total
    low = _low(matrix, sketch)
    q = matrix.new_zeros(m, 0)
    b = matrix.new_zeros(0, n)  # QᵀW, grown with Q
    while residual > target_sq:
        width = min(block, min(m, n) - q.shape[1], max_rank - q.shape[1])  # the last block may be narrower
        if width <= 0:
            return None
        omega = torch.randn(n, width, generator=generator, device=generator.device).to(matrix.device, matrix.dtype)
        qi = orthonormal(_times(low, omega) - q @ (b @ omega), twice=False)  # the part of WΩ outside span(Q)
        for _ in range(power_iters):
            zi = orthonormal(_times_t(low, qi) - b.T @ (q.T @ qi), twice=False)  # (n, width)
            qi = orthonormal(_times(low, zi) - q @ (b @ zi), twice=False)  # (m, width)
        qi = orthonormal(qi - q @ (q.T @ qi))  # orthonormal, and to Q, to rounding
        bi = qi.T @ matrix  # (width, m) @ (m, n) -> (width, n), in full precision: the residual is exact
        q = torch.cat([q, qi], dim=1)
        b = torch.cat([b, bi], dim=0)
        residual -= sum_of_squares(bi)
    # Subspace iterations over the whole basis sharpen its leading directions, so fewer of them
    # meet the target: on flat spectra the rank drops from ~8 % above optimal to ~2-4 %.
    if refinements:
        z = orthonormal(b.T, twice=False)  # b = QᵀW, so bᵀ = WᵀQ costs no pass over W; (n, k)
        for _ in range(refinements - 1):
            z = orthonormal(_times_t(low, orthonormal(_times(low, z), twice=False)), twice=False)
        refined = orthonormal(matrix @ z)  # (m, k), in full precision
        refined_b = refined.T @ matrix  # (k, n)
        refined_residual = total - sum_of_squares(refined_b)
        if refined_residual <= target_sq:
            q, b, residual = refined, refined_b, refined_residual
    u_small, s, vh = _svd_wide(b)
    return (q @ u_small, s, vh), max(residual, 0.0)
