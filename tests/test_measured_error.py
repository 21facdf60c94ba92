"""relative_error's fast path (large float32 matrices) agrees with numpy in float64."""

import numpy as np
import pytest
import torch

from lowrank_cli.linalg.factorize import relative_error


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise", [1e-3, 3e-2])
def test_large_float32_error_matches_numpy(factor_dtype, noise):
    g = torch.Generator().manual_seed(5)
    m, n, r = 1024, 1100, 24  # ≥ 2^20 entries: the float32 residual path
    w = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r**0.5
    w = w + noise * torch.randn(m, n, generator=g)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    b, a = (u[:, :r] * s[:r]).to(factor_dtype), vh[:r].to(factor_dtype)
    w64, b64, a64 = w.double().numpy(), b.double().numpy(), a.double().numpy()
    expected = np.linalg.norm(w64 - b64 @ a64) / np.linalg.norm(w64)
    assert expected > 1e-4
    assert relative_error(w, b, a) == pytest.approx(expected, rel=1e-6)
