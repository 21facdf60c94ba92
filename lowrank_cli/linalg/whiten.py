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


def whitener(moment: torch.Tensor) -> Whitener | None:
    """The damped Cholesky factor of a second moment; None for a zero (or non-finite) one, which cannot whiten."""
    c = moment.to(torch.float64)
    c = (c + c.T) / 2  # accumulated sums are symmetric only up to rounding
    n = c.shape[0]
    trace = float(c.diagonal().sum())
    if not trace > 0 or not bool(torch.isfinite(c).all()):
        return None
    damping = DAMPING * trace / n
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    while True:
        factor, info = torch.linalg.cholesky_ex(c + damping * eye)
        if info == 0:
            return Whitener(c, factor, damping)
        damping *= 10


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
