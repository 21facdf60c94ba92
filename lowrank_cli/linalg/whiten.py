"""Activation-aware factors (SVD-LLM, Wang et al. 2025): truncate W·S instead of W.

With C = E[x xᵀ] the second moment of a layer's input (n×n) and S its Cholesky factor (C = S·Sᵀ),

    ‖(W − W′)·X‖_F² / tokens = tr(ΔW·C·ΔWᵀ) = ‖ΔW·S‖_F²,

so the singular values of W·S are exactly the output error truncation causes, and the best rank-r
W′ for the layer's output is U_r·Σ_r·(V_rᵀ·S⁻¹), with W·S = U·Σ·Vᵀ: B = U_r·Σ_r, A = V_rᵀ·S⁻¹.

C is often singular (dead features, more inputs than tokens), so S is the Cholesky factor of
C + λ·I: λ starts at DAMPING·tr(C)/n and grows tenfold until the factorization succeeds. The
damping only changes which rank-r W′ is chosen; every error reported is measured with C itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DAMPING = 1e-6  # λ = DAMPING·tr(C)/n: well below any direction that carries output, above float rounding
_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class Whitener:
    """C (n, n) and S (n, n, lower triangular) with S·Sᵀ = C + λ·I."""

    moment: torch.Tensor
    factor: torch.Tensor
    damping: float  # λ

    def whiten(self, matrix: torch.Tensor) -> torch.Tensor:
        """W·S: (m, n) @ (n, n) -> (m, n)."""
        return matrix @ self.factor.to(matrix.dtype)

    def unwhiten(self, a: torch.Tensor) -> torch.Tensor:
        """A·S⁻¹ for the right factor A (r, n) of W·S, by a triangular solve (S is never inverted)."""
        return torch.linalg.solve_triangular(self.factor.to(a.dtype), a, upper=False, left=False)

    def unwhiten_factors(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of W·S ≈ B·A as factors of W: (B, A·S⁻¹)."""
        return b, self.unwhiten(a)

    def output_error(self, matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
        return output_error(matrix, b, a, self.moment)


# An unseen token's weight, as a share of the mean token's (1/V of all): its row still counts a little,
# so the subspace the table is cut to is not blind to the rows the calibration text never used.
ROW_FLOOR = 0.1


@dataclass(frozen=True)
class RowWeights:
    """An embedding table's statistics: how often each row (token) was looked up.

    A lookup's input is one-hot, so E[x xᵀ] = diag(p), p the tokens' frequencies: the output error of
    E′ is Σ_i p_i ‖E_i − E′_i‖² = ‖D^½·(E − E′)‖_F², with D = diag(d). The best E′ of rank r is
    D^-½·[D^½·E]_r: the SVD is of D^½·E, and B = D^-½·U_r·Σ_r, A = V_rᵀ. Each row of E′ is E_i
    projected onto V_r, so a token the text never used keeps a usable row; d_i = p_i + ROW_FLOOR/V
    lets those rows count a little in choosing V_r.
    """

    weights: torch.Tensor  # d (V,), float64, every entry > 0

    @classmethod
    def of_counts(cls, counts: torch.Tensor) -> RowWeights | None:
        counts = counts.to(torch.float64)
        total = float(counts.sum())
        if not total > 0 or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            return None
        return cls(counts / total + ROW_FLOOR / counts.numel())

    def whiten(self, matrix: torch.Tensor) -> torch.Tensor:
        """D^½·E: (V, 1) * (V, d) -> (V, d)."""
        return self.weights.sqrt().to(matrix.device, matrix.dtype)[:, None] * matrix

    def unwhiten_factors(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of D^½·E ≈ B·A as factors of E: (D^-½·B, A)."""
        return b / self.weights.sqrt().to(b.device, b.dtype)[:, None], a

    def output_error(self, matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
        """√(Σ_i d_i‖ΔE_i‖² / Σ_i d_i‖E_i‖²), ΔE = E − B·A, in float64 and row blocks."""
        d = self.weights.to(matrix.device)
        a = a.to(torch.float64)
        residual = total = 0.0
        for start in range(0, matrix.shape[0], _CHUNK_ROWS):
            w = matrix[start : start + _CHUNK_ROWS].to(torch.float64)
            delta = w - b[start : start + _CHUNK_ROWS].to(torch.float64) @ a  # (rows, r) @ (r, n) -> (rows, n)
            rows = d[start : start + _CHUNK_ROWS]
            residual += float((rows * delta.square().sum(dim=1)).sum())
            total += float((rows * w.square().sum(dim=1)).sum())
        return residual**0.5 / total**0.5 if total > 0 else 0.0


def whitener(moment: torch.Tensor) -> Whitener | None:
    """The damped Cholesky factor of a second moment; None for a zero (or non-finite) one, which cannot whiten.

    Two n×n float64 tensors, C and S (a 1B model's MLP input: 250 MB each): C is symmetrized and damped
    in place, and the damping taken off again once S is made.
    """
    c = moment.to(torch.float64, copy=True)
    symmetrize_(c)  # accumulated sums are symmetric only up to rounding
    n = c.shape[0]
    trace = float(c.diagonal().sum())
    if not trace > 0 or not bool(torch.isfinite(c).all()):
        return None
    damping, added = DAMPING * trace / n, 0.0
    while True:
        c.diagonal().add_(damping - added)  # C + λ·I
        added = damping
        factor, info = torch.linalg.cholesky_ex(c)
        if info == 0:
            c.diagonal().sub_(added)  # C again (to rounding: each diagonal entry within an ulp of λ)
            return Whitener(c, factor, damping)
        del factor
        damping *= 10


BAND = 256  # rows of a matrix symmetrized at a time: no second n×n temporary


def symmetrize_(c: torch.Tensor) -> torch.Tensor:
    """c ← (c + cᵀ) / 2 in place, a band of rows at a time (each band's mirror is read before it is written)."""
    n = c.shape[0]
    for i in range(0, n, BAND):
        band = (c[i : i + BAND, i:] + c[i:, i : i + BAND].T) / 2  # (rows, n − i): these rows from the diagonal on
        c[i : i + BAND, i:] = band
        c[i:, i : i + BAND] = band.T
    return c


def output_error(matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor, moment: torch.Tensor) -> float:
    """√(tr(ΔW·C·ΔWᵀ) / tr(W·C·Wᵀ)) with ΔW = W − B·A: ‖(W − BA)X‖_F / ‖WX‖_F for inputs X with E[xxᵀ] = C.

    In float64 and in row blocks, so no m×n temporary beyond one block is made. 0 when W·C·Wᵀ has
    no trace (the layer's output is always zero).
    """
    c = moment.to(torch.float64)
    a = a.to(torch.float64)
    residual = total = 0.0
    for start in range(0, matrix.shape[0], _CHUNK_ROWS):
        w = matrix[start : start + _CHUNK_ROWS].to(torch.float64)
        delta = w - b[start : start + _CHUNK_ROWS].to(torch.float64) @ a  # (rows, r) @ (r, n) -> (rows, n)
        residual += float(((delta @ c) * delta).sum())  # Σ_i δ_iᵀ·C·δ_i = tr(ΔW·C·ΔWᵀ) over these rows
        total += float(((w @ c) * w).sum())
    if total <= 0.0:
        return 0.0
    return max(residual, 0.0) ** 0.5 / total**0.5
