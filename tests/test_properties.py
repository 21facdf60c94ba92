"""Hypothesis properties: ranks, errors, parameter counts and the compress → expand round trip."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FACTOR_DTYPE,
    TORCH_DTYPE,
    as_matrix,
    by_name,
    cli,
    cli_json,
    file_metadata,
    load,
    low_rank,
    raw_tensors,
    relative_error,
    save,
    singular_values,
    tail_errors,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_cli.linalg.spectrum import Spectrum

FAST = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def rank_k_shapes(draw, low=2, high=40):
    m = draw(st.integers(low, high))
    n = draw(st.integers(low, high))
    k = draw(st.integers(1, min(m, n)))
    return m, n, k


@FAST
@given(shape=rank_k_shapes(), seed=seeds)
def test_numerical_rank_of_a_rank_k_product_is_k(shape, seed):
    m, n, k = shape
    w = low_rank(m, n, k, seed)
    with tempfile.TemporaryDirectory() as folder:
        source = save(Path(folder) / "w.safetensors", {"W": w})
        assert by_name(cli_json("analyze", source))["W"]["numerical_rank"] == k


@FAST
@given(shape=rank_k_shapes(), seed=seeds)
def test_compress_at_rank_k_reconstructs(shape, seed):
    m, n, k = shape
    w = low_rank(m, n, k, seed)
    with tempfile.TemporaryDirectory() as folder:
        source = save(Path(folder) / "w.safetensors", {"W": w})
        compressed, dense = Path(folder) / "c.safetensors", Path(folder) / "d.safetensors"
        t = by_name(cli_json("compress", source, "--rank", k, "-o", compressed))["W"]
        assert t["rank"] == k
        if k * (m + n) < m * n:
            factors = load(compressed)
            assert relative_error(w, factors["W.B"], factors["W.A"]) <= 1e-5
        assert cli("expand", compressed, "-o", dense).exit_code == 0
        w2 = load(dense)["W"]
        assert float(torch.linalg.vector_norm(w - w2) / torch.linalg.vector_norm(w)) <= 1e-5


@FAST
@given(shape=rank_k_shapes(high=30), full_rank=st.booleans(), seed=seeds)
def test_spectrum_error_is_non_increasing_in_rank(shape, full_rank, seed):
    m, n, k = shape
    w = low_rank(m, n, min(m, n) if full_rank else k, seed)
    spectrum = Spectrum.of(torch.linalg.svdvals(w), (m, n))
    errors = [spectrum.relative_error(r) for r in range(min(m, n) + 1)]
    assert errors[0] == pytest.approx(1.0, abs=1e-9)
    assert errors[-1] == 0.0
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:], strict=False))
    np.testing.assert_allclose(errors, tail_errors(singular_values(w)), atol=1e-5)


@FAST
@given(m=st.integers(3, 14), n=st.integers(3, 14), seed=seeds)
def test_measured_error_is_non_increasing_in_rank(m, n, seed):
    w = low_rank(m, n, min(m, n), seed)  # full rank: every error is well above float32 rounding
    optimal = tail_errors(singular_values(w))
    measured = []
    with tempfile.TemporaryDirectory() as folder:
        source = save(Path(folder) / "w.safetensors", {"W": w})
        out = Path(folder) / "c.safetensors"
        for r in range(1, min(m, n) + 1):
            if r * (m + n) >= m * n:
                break
            t = by_name(cli_json("compress", source, "--rank", r, "-o", out, "--force"))["W"]
            factors = load(out)
            measured.append(relative_error(w, factors["W.B"], factors["W.A"]))
            assert t["rel_error"] == pytest.approx(measured[-1], rel=1e-6)
            assert measured[-1] >= optimal[r] - 1e-6  # Eckart–Young: nothing beats the truncated SVD
            assert measured[-1] == pytest.approx(optimal[r], rel=1e-4, abs=1e-6)
    assert all(later <= earlier + 1e-6 for earlier, later in zip(measured, measured[1:], strict=False))


@FAST
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    requested=st.integers(1, 34),
    dtype=st.sampled_from(["F32", "F16", "BF16", "F64"]),
    factor_dtype=st.sampled_from(["keep", "float32", "float16", "bfloat16"]),
    seed=seeds,
)
def test_reported_error_and_params_are_what_was_written(m, n, requested, dtype, factor_dtype, seed):
    w = low_rank(m, n, min(m, n), seed, dtype=TORCH_DTYPE[dtype])
    rank = min(requested, m, n)
    with tempfile.TemporaryDirectory() as folder:
        source = save(Path(folder) / "w.safetensors", {"W": w})
        out = Path(folder) / "c.safetensors"
        t = by_name(cli_json("compress", source, "--rank", requested, "--dtype", factor_dtype, "-o", out))["W"]
        assert t["rank"] == rank
        assert t["params"] == m * n
        raw = raw_tensors(out)
        if rank * (m + n) < m * n:
            assert t["status"] == "factorized"
            stored = dtype if factor_dtype == "keep" else FACTOR_DTYPE[factor_dtype]
            assert raw["W.B"][:2] == (stored, (m, rank)) and raw["W.A"][:2] == (stored, (rank, n))
            assert t["params_after"] == rank * (m + n)
            factors = load(out)
            assert t["rel_error"] == pytest.approx(
                relative_error(w, factors["W.B"], factors["W.A"]), rel=1e-6, abs=1e-12
            )
        else:
            assert t["status"] == "dense"
            assert t["params_after"] == m * n
            stored = dtype if factor_dtype == "keep" else FACTOR_DTYPE[factor_dtype]
            if stored == dtype:
                assert raw["W"] == raw_tensors(source)["W"]
            else:  # --dtype casts dense tensors too; the error is the cast's, measured on what was written
                assert raw["W"][0] == stored
                cast = load(out)["W"].double()
                expected = float(torch.linalg.vector_norm(w.double() - cast) / torch.linalg.vector_norm(w.double()))
                assert t["rel_error"] == pytest.approx(expected, rel=1e-9, abs=1e-15)


FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _cast_breaks_the_bound(tensor: torch.Tensor, factor_dtype: str, policy: list[str], status: str) -> bool:
    """A matrix --max-error keeps whole stays in its own dtype when the cast to --dtype alone would exceed the bound."""
    if status != "dense" or policy[0] != "--max-error" or factor_dtype == "keep":
        return False
    w = tensor.double()
    cast = tensor.to(TORCH_DTYPE[FACTOR_DTYPE[factor_dtype]]).double()
    norm = float(torch.linalg.vector_norm(w))
    return norm > 0 and float(torch.linalg.vector_norm(w - cast)) / norm > float(policy[1])


@st.composite
def checkpoints(draw):
    """A few tensors of assorted shapes and dtypes, made from a seed (never NaN or Inf)."""
    rng = np.random.default_rng(draw(seeds))
    tensors = {}
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["matrix", "lowrank", "conv", "vector", "int", "bool", "empty", "scalar"]))
        dtype = draw(st.sampled_from(FLOATS))
        m, n = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        if kind == "matrix":
            t = torch.from_numpy(rng.standard_normal((m, n))).to(dtype)
        elif kind == "lowrank":
            k = draw(st.integers(1, min(m, n)))
            t = torch.from_numpy(rng.standard_normal((m, k)) @ rng.standard_normal((k, n))).to(dtype)
        elif kind == "conv":
            shape = (m, draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            t = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
        elif kind == "vector":
            t = torch.from_numpy(rng.standard_normal(m)).to(dtype)
        elif kind == "int":
            t = torch.from_numpy(rng.integers(-1000, 1000, (m, n)))
        elif kind == "bool":
            t = torch.from_numpy(rng.random((m, n)) < 0.5)
        elif kind == "empty":
            t = torch.zeros((0, n), dtype=dtype)
        else:
            t = torch.tensor(float(rng.standard_normal()), dtype=dtype)
        tensors[f"layers.{i}.{kind}"] = t
    return tensors


# A metadata dict that is empty ({}) is left to test_expand.test_empty_metadata_is_kept.
metadata_values = st.none() | st.dictionaries(
    st.sampled_from(["format", "note", "step", "ünï"]), st.text(max_size=12), min_size=1, max_size=3
)
policies = st.one_of(
    st.integers(1, 30).map(lambda r: ["--rank", str(r)]),
    st.floats(0.05, 1.0).map(lambda f: ["--energy", repr(f)]),
    st.floats(0.0, 0.95).map(lambda e: ["--max-error", repr(e)]),
)


@FAST
@given(
    tensors=checkpoints(),
    metadata=metadata_values,
    policy=policies,
    factor_dtype=st.sampled_from(["keep", "float32", "float16", "bfloat16"]),
)
def test_compress_expand_roundtrip_keeps_everything_but_factorized_values(tensors, metadata, policy, factor_dtype):
    with tempfile.TemporaryDirectory() as folder:
        source = save(Path(folder) / "m.safetensors", tensors, metadata)
        compressed, dense = Path(folder) / "c.safetensors", Path(folder) / "d.safetensors"
        report = by_name(cli_json("compress", source, *policy, "--dtype", factor_dtype, "-o", compressed))
        result = cli("expand", compressed, "-o", dense)
        assert result.exit_code == 0, result.stderr

        assert set(report) == set(tensors)
        assert file_metadata(dense) == metadata
        raw_in, raw_out = raw_tensors(source), raw_tensors(dense)
        assert set(raw_out) == set(raw_in)
        expanded = load(dense)
        for name, tensor in tensors.items():
            assert raw_out[name][:2] == raw_in[name][:2], name  # dtype code and shape
            assert expanded[name].dtype == tensor.dtype and expanded[name].shape == tensor.shape, name
            t = report[name]
            if t["status"] == "factorized":
                m, n = as_matrix(tensor).shape
                assert t["params_after"] == t["rank"] * (m + n) < m * n, name
            elif (
                factor_dtype == "keep"
                or not tensor.is_floating_point()
                or t["rel_error"] is None
                or _cast_breaks_the_bound(tensor, factor_dtype, policy, t["status"])
            ):
                assert raw_out[name] == raw_in[name], name  # copied bit for bit
                if tensor.dtype != torch.bool and tensor.numel():
                    assert torch.equal(expanded[name], tensor), name
            else:  # cast to --dtype by compress, back to its own dtype by expand: rounded once
                stored = TORCH_DTYPE[FACTOR_DTYPE[factor_dtype]]
                torch.testing.assert_close(expanded[name], tensor.to(stored).to(tensor.dtype), rtol=0, atol=0)
