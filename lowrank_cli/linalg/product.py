"""The SVD of a product B·A taken from its factors: never the m×n matrix itself.

With B = Q_b·R_b and Aᵀ = Q_a·R_a (thin QR), s·B·A = Q_b·(s·R_b·R_aᵀ)·Q_aᵀ, and Q_b, Q_a have
orthonormal columns: the singular values of the product are those of the small core s·R_b·R_aᵀ,
and a truncation C ≈ b·a of the core is one of the product, B′ = Q_b·b, A′ = a·Q_aᵀ, with the
same error ‖s·B·A − B′·A′‖_F = ‖C − b·a‖_F. Costs O((m + n)·r²) instead of O(m·n·min(m, n)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProductCore:
    """s·B·A = q_b · core · q_aᵀ."""

    q_b: torch.Tensor  # (m, k_b), orthonormal columns
    core: torch.Tensor  # (k_b, k_a)
    q_a: torch.Tensor  # (n, k_a), orthonormal columns

    def expand(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors b (k_b, r′), a (r′, k_a) of the core as factors of the product: (m, r′) and (r′, n)."""
        return self.q_b @ b, a @ self.q_a.T  # (m, k_b) @ (k_b, r′), (r′, k_a) @ (k_a, n)


def product_core(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> ProductCore:
    """The core of scale·B·A for B (m, r) and A (r, n), in their dtype (float64 advised)."""
    q_b, r_b = torch.linalg.qr(b)  # (m, k_b), (k_b, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (n, k_a), (k_a, r)
    return ProductCore(q_b, scale * (r_b @ r_a.T), q_a)  # (k_b, r) @ (r, k_a) -> (k_b, k_a)


def product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B·A‖_F from the factors: ‖R_b·R_aᵀ‖_F, in float64."""
    return float(torch.linalg.matrix_norm(product_core(b.to(torch.float64), a.to(torch.float64)).core))


def difference_norm(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """‖B1·A1 − B2·A2‖_F from the factors: the product [B1, −B2]·[A1; A2], in float64."""
    b = torch.cat([b1.to(torch.float64), -b2.to(torch.float64)], dim=1)  # (m, r1 + r2)
    a = torch.cat([a1.to(torch.float64), a2.to(torch.float64)], dim=0)  # (r1 + r2, n)
    return product_norm(b, a)
