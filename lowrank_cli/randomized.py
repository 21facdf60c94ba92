"""Randomized truncated SVD (Halko, Martinsson & Tropp 2011), fixed-rank and adaptive.

Work is O(m·n·k) for a basis of k columns instead of the O(m·n·min(m, n)) of a full SVD.
The adaptive form (the blocked randQB of Yu, Gu & Li 2018) grows an orthonormal basis Q
until the residual, known exactly as ‖W − QQᵀW‖_F² = ‖W‖_F² − ‖QᵀW‖_F², meets the target.
"""

from __future__ import annotations

import torch

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def _svd_wide(b: torch.Tensor) -> Triple:
    """SVD of a wide k×n matrix through the QR of bᵀ: 4× faster than svd(b) for k = n/8 here."""
    q, r = torch.linalg.qr(b.T)  # (n, k), (k, k): b = rᵀ·qᵀ
    u, s, vh_r = torch.linalg.svd(r.T)  # rᵀ = u·diag(s)·vh_r
    return u, s, vh_r @ q.T  # (k, k) @ (k, n) -> (k, n)


def randomized_svd(
    matrix: torch.Tensor, rank: int, *, oversample: int, power_iters: int, generator: torch.Generator
) -> Triple:
    """The leading `rank` singular triplets of an m×n matrix: U (m, r), S (r,), Vh (r, n)."""
    m, n = matrix.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device=generator.device).to(matrix.device, matrix.dtype)
    q = _orth(matrix @ omega)  # (m, n) @ (n, k) -> (m, k)
    for _ in range(power_iters):  # sharpen the decay: the range of (WWᵀ)^q W
        q = _orth(matrix.T @ q)  # (n, k)
        q = _orth(matrix @ q)  # (m, k)
    small = q.T @ matrix  # (k, m) @ (m, n) -> (k, n)
    u_small, s, vh = _svd_wide(small)
    u = q @ u_small  # (m, k) @ (k, k) -> (m, k)
    return u[:, :rank], s[:rank], vh[:rank]


def adaptive_range(
    matrix: torch.Tensor,
    target_sq: float,
    *,
    block: int,
    power_iters: int,
    max_rank: int,
    generator: torch.Generator,
    refinements: int = 1,
) -> tuple[Triple, float] | None:
    """Grow Q in blocks until ‖W − QQᵀW‖_F² ≤ target_sq; then the SVD of QᵀW.

    Returns (U, S, Vh) of QQᵀW with its k = Q's width singular values, and the residual
    ‖W − QQᵀW‖_F² (float64), or None once k would pass max_rank without meeting the target.
    """
    m, n = matrix.shape
    total = residual = float(torch.linalg.vector_norm(matrix, dtype=torch.float64) ** 2)
    q = matrix.new_zeros(m, 0)
    b = matrix.new_zeros(0, n)  # QᵀW, grown with Q
    while residual > target_sq:
        width = min(block, min(m, n) - q.shape[1], max_rank - q.shape[1])  # the last block may be narrower
        if width <= 0:
            return None
        omega = torch.randn(n, width, generator=generator, device=generator.device).to(matrix.device, matrix.dtype)
        qi = _orth(matrix @ omega - q @ (b @ omega))  # the part of WΩ outside span(Q)
        for _ in range(power_iters):
            zi = _orth(matrix.T @ qi - b.T @ (q.T @ qi))  # (n, width)
            qi = _orth(matrix @ zi - q @ (b @ zi))  # (m, width)
        qi = _orth(qi - q @ (q.T @ qi))  # re-orthogonalize against Q once more
        bi = qi.T @ matrix  # (width, m) @ (m, n) -> (width, n)
        q = torch.cat([q, qi], dim=1)
        b = torch.cat([b, bi], dim=0)
        residual -= float(torch.linalg.vector_norm(bi, dtype=torch.float64) ** 2)
    # Subspace iterations over the whole basis sharpen its leading directions, so fewer of them
    # meet the target: on flat spectra the rank drops from ~8 % above optimal to ~2-4 %.
    for _ in range(refinements):
        refined = _orth(matrix @ _orth(b.T))  # b = QᵀW, so bᵀ = WᵀQ costs no pass over W; (m, k)
        refined_b = refined.T @ matrix  # (k, n)
        refined_residual = total - float(torch.linalg.vector_norm(refined_b, dtype=torch.float64) ** 2)
        if refined_residual > target_sq:
            break
        q, b, residual = refined, refined_b, refined_residual
    u_small, s, vh = _svd_wide(b)
    return (q @ u_small, s, vh), max(residual, 0.0)
