"""Truncated-SVD factors W ≈ B·A and the error they actually make."""

from __future__ import annotations

import torch

_CHUNK_BYTES = 64 << 20


def exact_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m, k), S (k,), Vh (k, n) with k = min(m, n)."""
    return torch.linalg.svd(matrix, full_matrices=False)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_r·diag(S_r) (m, r) and A = V_rᵀ (r, n)."""
    b = u[:, :rank] * s[:rank]  # (m, r) * (r,) -> (m, r)
    a = vh[:rank]  # (r, n)
    return b, a


def relative_error(matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """‖W − B·A‖_F / ‖W‖_F in float64, in row blocks so no m×n float64 temporary is made."""
    a64 = a.to(torch.float64)
    rows = max(1, _CHUNK_BYTES // (8 * max(1, matrix.shape[1])))
    residual = total = 0.0
    for start in range(0, matrix.shape[0], rows):
        w = matrix[start : start + rows].to(torch.float64)
        approx = b[start : start + rows].to(torch.float64) @ a64  # (rows, r) @ (r, n) -> (rows, n)
        residual += float(torch.linalg.vector_norm(w - approx) ** 2)
        total += float(torch.linalg.vector_norm(w) ** 2)
    return (residual / total) ** 0.5 if total > 0 else 0.0
