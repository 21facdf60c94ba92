"""The reference example from the issue, end to end through the CLI."""

from __future__ import annotations

import shutil

import torch
from conftest import SAMPLES, by_name, cli, cli_json, load, raw_tensors, relative_error, sha256


def _regenerate() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seeded draws, which are portable bit for bit (CPU generator), and W's two factors."""
    torch.manual_seed(0)
    left, right = torch.randn(10, 2), torch.randn(2, 10)
    return left, right, torch.randn(10), torch.randn(10)


def test_sample_file_is_the_reference_example():
    stored = load(SAMPLES / "seed_rank2.safetensors")
    left, right, b, x = _regenerate()
    assert sorted(stored) == ["W", "b", "x"]
    assert all(t.dtype == torch.float32 for t in stored.values())
    assert torch.equal(stored["b"], b) and torch.equal(stored["x"], x)
    # W = left @ right: a matmul's last bits differ between CPUs (FMA, summation order), so compare
    # to float32 rounding of a 2-term dot product: |error| ≤ 2·ε·Σ|l_ik·r_kj|.
    bound = 2 * torch.finfo(torch.float32).eps * (left.abs() @ right.abs())
    exact = left.double() @ right.double()
    assert bool(((stored["W"].double() - exact).abs() <= bound.double()).all())


def test_reference_example_end_to_end(tmp_path):
    source = tmp_path / "seed_rank2.safetensors"
    shutil.copyfile(SAMPLES / "seed_rank2.safetensors", source)
    before = sha256(source)
    original = load(source)
    w, b, x = original["W"], original["b"], original["x"]

    # analyze: W = randn(10, 2) @ randn(2, 10) has numerical rank 2
    analyzed = by_name(cli_json("analyze", source))
    assert analyzed["W"]["numerical_rank"] == 2
    assert analyzed["W"]["shape"] == [10, 10]

    # compress --rank 2: W is stored as 40 numbers instead of 100
    compressed = tmp_path / "c.safetensors"
    report = by_name(cli_json("compress", source, "--rank", "2", "-o", compressed))
    factors = load(compressed)
    assert "W" not in factors
    assert tuple(factors["W.B"].shape) == (10, 2)
    assert tuple(factors["W.A"].shape) == (2, 10)
    assert factors["W.B"].numel() + factors["W.A"].numel() == 40
    assert w.numel() == 100
    assert report["W"]["status"] == "factorized"
    assert report["W"]["rank"] == 2
    assert report["W"]["params_after"] == 40
    assert relative_error(w, factors["W.B"], factors["W.A"]) < 1e-6
    # b and x are copied bit for bit
    raw_in, raw_out = raw_tensors(source), raw_tensors(compressed)
    assert raw_out["b"] == raw_in["b"] and raw_out["x"] == raw_in["x"]

    # expand: y = W·x + b and y' = W'·x + b agree to 1e-5
    dense = tmp_path / "d.safetensors"
    result = cli("expand", compressed, "-o", dense)
    assert result.exit_code == 0, result.stderr
    expanded = load(dense)
    assert sorted(expanded) == ["W", "b", "x"]
    assert expanded["W"].dtype == torch.float32 and tuple(expanded["W"].shape) == (10, 10)
    y = w @ x + b
    y_prime = expanded["W"] @ expanded["x"] + expanded["b"]
    assert torch.allclose(y, y_prime, rtol=1e-5, atol=1e-5), (y - y_prime).abs().max()

    assert sha256(source) == before
