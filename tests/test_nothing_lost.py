"""Issue 19, "Nothing lost, nothing false": no reported number the files on disk do not bear out,
no value written that the input did not hold, and a one-line refusal where lowrank cannot keep either promise.

Every hostile input is made here in tmp_path; every expected number is recomputed from the files as written.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TORCH_DTYPE,
    assert_clean_failure,
    cli,
    cli_json,
    file_metadata,
    geometric,
    listing,
    load,
    relative_error,
    save,
    sha256,
    with_spectrum,
)

# --- 6: --max-error is met by the factors as stored, in every dtype --------------------------------


def _tail_errors(w: torch.Tensor) -> np.ndarray:
    """tail[r]: the optimal rank-r relative error of W, in float64."""
    s = np.linalg.svd(w.to(torch.float64).numpy(), compute_uv=False)
    return np.sqrt(np.cumsum((s**2)[::-1])[::-1] / (s**2).sum())


@pytest.mark.parametrize(("dtype", "ratio", "target"), [("bfloat16", 0.9, 0.005), ("float16", 0.8, 0.0004)])
def test_max_error_is_met_on_the_stored_factors(tmp_path, dtype, ratio, target):
    """The spectrum's rank misses the target once B and A are rounded to 16 bits: more terms, measured."""
    w = with_spectrum(128, 96, geometric(96, ratio))
    source = save(tmp_path / "w.safetensors", {"w": w})
    out = tmp_path / "w.lowrank.safetensors"
    row = cli_json("compress", source, "--max-error", target, "--dtype", dtype, "-o", out)["tensors"][0]
    factors = load(out)
    assert factors["w.B"].dtype == TORCH_DTYPE["BF16" if dtype == "bfloat16" else "F16"]
    measured = relative_error(w, factors["w.B"], factors["w.A"])
    assert row["status"] == "factorized"
    assert measured <= target
    assert row["rel_error"] == pytest.approx(measured, rel=1e-5)
    spectral_rank = int(np.argmax(_tail_errors(w) <= target))  # what the spectrum alone would keep
    assert row["rank"] > spectral_rank  # the float32 rank would have missed; lowrank added terms


def test_max_error_below_the_dtypes_floor_keeps_the_tensor_dense(tmp_path):
    """bfloat16 rounding alone costs ~2e-3 of ‖W‖: no rank meets 1e-3, so W is stored whole, and in its own
    float32, since a bfloat16 copy would miss 1e-3 too: the bound holds on what is written."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 8, generator=gen) @ torch.randn(8, 256, generator=gen)
    w += 1e-4 * torch.randn(256, 256, generator=gen)
    source = save(tmp_path / "w.safetensors", {"w": w})
    out = tmp_path / "w.lowrank.safetensors"
    row = cli_json("compress", source, "--max-error", 0.001, "--dtype", "bfloat16", "-o", out)["tensors"][0]
    assert row["status"] == "dense"
    assert "bfloat16" in row["reason"] and "0.001" in row["reason"]
    written = load(out)
    assert set(written) == {"w"}
    assert written["w"].dtype == torch.float32
    w64 = w.to(torch.float64)
    assert float(torch.linalg.norm(w64 - w.bfloat16().to(torch.float64)) / torch.linalg.norm(w64)) > 0.001
    error = float(torch.linalg.norm(w64 - written["w"].to(torch.float64)) / torch.linalg.norm(w64))
    assert row["rel_error"] == error == 0.0 and "kept in float32" in row["reason"]


# --- 7, 8: expand writes only finite values of the declared dtype, and only what fits in memory ------


def _lowrank_file(path, b: torch.Tensor, a: torch.Tensor, shape: list[int], dtype: str = "F32"):
    """A lowrank file written by hand from docs/format.md: one tensor 'w' stored as w.B · w.A."""
    record = {"shape": shape, "dtype": dtype, "rank": b.shape[1], "rel_error": 0.0, "split": "us"}
    payload = {"format_version": 1, "input_metadata": False, "tensors": {"w": record}}
    return save(path, {"w.B": b, "w.A": a}, {"lowrank": json.dumps(payload)})


def _assert_expand_refused(tmp_path, source, *words: str) -> str:
    before, digest = listing(tmp_path), sha256(source)
    result = cli("expand", source)
    assert_clean_failure(result, 1, str(source), "'w'", *words)
    assert listing(tmp_path) == before  # no output, no temporary
    assert sha256(source) == digest
    return result.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_expand_refuses_a_non_finite_factor(tmp_path, bad):
    b = torch.ones(6, 2)
    b[3, 1] = bad
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", b, torch.ones(2, 5), [6, 5])
    assert "w.B" in _assert_expand_refused(tmp_path, source, "NaN or Inf")


def test_expand_refuses_a_product_that_overflows_float16(tmp_path):
    """Finite float32 factors whose product, 300·300 = 90000, is above float16's 65504."""
    b, a = torch.full((4, 1), 300.0), torch.full((1, 3), 300.0)
    assert float(torch.finfo(torch.float16).max) < 90000.0
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", b, a, [4, 3], dtype="F16")
    _assert_expand_refused(tmp_path, source, "overflows F16")


@pytest.mark.parametrize("dtype", ["BOOL", "I64", "U8"])
def test_expand_refuses_a_record_declaring_a_non_float_dtype(tmp_path, dtype):
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", torch.ones(6, 2), torch.ones(2, 5), [6, 5], dtype)
    _assert_expand_refused(tmp_path, source, dtype)


def test_expand_refuses_a_product_larger_than_memory(tmp_path):
    """A few hundred bytes declaring a 10⁷×10⁷ tensor of rank 0: 800 TB of float32 zeros, never allocated."""
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", torch.ones(10**7, 0), torch.ones(0, 10**7), [10**7] * 2)
    assert source.stat().st_size < 1000
    _assert_expand_refused(tmp_path, source, "GiB", "memory")


def test_expand_refuses_a_record_its_factors_do_not_describe(tmp_path):
    """Rank·(m + n) must be what is stored: a 200000² record over a 6×2 and a 2×5 factor is refused before reading."""
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", torch.ones(6, 2), torch.ones(2, 5), [200000, 200000])
    _assert_expand_refused(tmp_path, source, "(6, 2)", "(200000, 2)")


def test_apply_factors_shares_the_factor_check(tmp_path):
    """apply_factors reads the same check: the record says 6×5 at rank 2, the factors are 6×3 and 3×5."""
    from lowrank_cli import apply_factors
    from lowrank_cli.errors import CheckpointError

    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", torch.ones(6, 3), torch.ones(3, 5), [6, 5])
    payload = json.loads(file_metadata(source)["lowrank"])
    payload["tensors"]["w"]["rank"] = 2
    save(source, load(source), {"lowrank": json.dumps(payload)})
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(6, 5))
    with pytest.raises(CheckpointError, match=r"factors of 'w' have shapes \(6, 3\) and \(3, 5\), not \(6, 2\)"):
        apply_factors(model, source)


# --- 9, 15: a statistics file holds second moments, with metadata of the documented types -----------


def _model_and_stats(tmp_path, moment: torch.Tensor, **payload_changes) -> tuple:
    """A 10×6 weight 'w' and a statistics file giving its input the moment, written without write_calibration."""
    gen = torch.Generator().manual_seed(0)
    model = save(tmp_path / "model.safetensors", {"w": torch.randn(10, 6, generator=gen)})
    raw = payload_changes.pop("raw", None)
    payload = {"format_version": 1, "tokens": 100, "text_sha256": None, "inputs": {"w": "x"}, "transposed": []}
    metadata = {"lowrank_calibration": raw or json.dumps({**payload, **payload_changes})}
    stats = save(tmp_path / "stats.safetensors", {"x": moment}, metadata)
    return model, stats


def _indefinite() -> torch.Tensor:
    c = torch.eye(6)
    c[0, 1] = c[1, 0] = 2.0  # the block [[1, 2], [2, 1]] has eigenvalue −1
    assert float(torch.linalg.eigvalsh(c.double())[0]) == pytest.approx(-1.0)
    return c


def _with(value: float, at: tuple[int, int] = (5, 5)) -> torch.Tensor:
    c = torch.eye(6)
    c[at] = value
    return c


BAD_MOMENTS = {
    "indefinite": (_indefinite(), "indefinite"),
    "negative variance": (_with(-1.0), "negative diagonal"),
    "NaN": (_with(float("nan")), "NaN or Inf"),
    "Inf": (_with(float("inf")), "NaN or Inf"),
    "not symmetric": (_with(0.5, (0, 1)), "not symmetric"),
    "F64 entries of 1e307": (torch.full((6, 6), 1e307, dtype=torch.float64), "too large"),
}


@pytest.mark.parametrize("case", sorted(BAD_MOMENTS))
def test_a_moment_that_is_no_second_moment_is_refused(tmp_path, case):
    moment, problem = BAD_MOMENTS[case]
    model, stats = _model_and_stats(tmp_path, moment)
    before = listing(tmp_path)
    result = cli("compress", model, "--rank", 2, "--calibration", stats)
    assert_clean_failure(result, 1, str(stats), "moment 'x'", problem, "rerun lowrank calibrate")
    assert listing(tmp_path) == before


def test_a_rank_deficient_float32_moment_is_accepted(tmp_path):
    """Fewer tokens than inputs: C is singular and its float32 rounding may dip below zero by ~n·ε; still a moment."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 6)) * np.array([1e3, 1, 1, 1, 1, 1e-3])
    moment = torch.from_numpy(x.T @ x / len(x)).float()
    model, stats = _model_and_stats(tmp_path, moment)
    report = cli_json("compress", model, "--rank", 2, "--calibration", stats, "-o", tmp_path / "out.safetensors")
    assert report["tensors"][0]["status"] == "factorized"
    assert report["tensors"][0]["output_error"] is not None


BAD_FIELDS = {
    "tokens a string": dict(tokens="many"),
    "tokens a list": dict(tokens=[100]),
    "tokens a bool": dict(tokens=True),
    "transposed an int": dict(transposed=3),
    "transposed nested": dict(transposed=[["w"]]),
    "inputs nested": dict(inputs={"w": {"key": "x"}}),
    "text_sha256 a number": dict(text_sha256=7),
    "payload a list": dict(raw="[1, 2]"),
    "payload deeply nested": dict(raw="[" * 100_000 + "]" * 100_000),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_calibration_metadata_of_the_wrong_type_is_one_line(tmp_path, case):
    model, stats = _model_and_stats(tmp_path, torch.eye(6), **BAD_FIELDS[case])
    result = cli("compress", model, "--rank", 2, "--calibration", stats)
    assert_clean_failure(result, 1, str(stats))


# --- 13, 14: a compressed folder is not calibrated or analyzed; config.json problems are one line ----


def _compressed_bert(tmp_path):
    from test_calibration import tiny_model_folder

    folder, text = tiny_model_folder(tmp_path, head=False)
    out = tmp_path / "bert.lowrank"
    assert cli("compress", folder, "--rank", 4, "-o", out).exit_code == 0
    return folder, out, text


def test_calibrate_refuses_a_compressed_folder(tmp_path):
    _, compressed, text = _compressed_bert(tmp_path)
    stats = tmp_path / "stats.safetensors"
    result = cli("calibrate", compressed, "-o", stats, "--text", text, "--seq-len", 16)
    assert_clean_failure(
        result, 1, str(compressed / "model.lowrank.safetensors"), "is a lowrank file", "lowrank expand"
    )
    assert not stats.exists()


def test_analyze_refuses_a_lowrank_file(tmp_path):
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", torch.ones(6, 2), torch.ones(2, 5), [6, 5])
    result = cli("analyze", source)
    assert_clean_failure(result, 1, str(source), "is a lowrank file", "lowrank expand")


BAD_CONFIGS = {
    "not JSON": "{not json",
    "a JSON list": "[1, 2]",
    "model_type a number": json.dumps({"model_type": 5}),
    "a field of the wrong type": json.dumps({"model_type": "bert", "hidden_size": "big"}),
    "custom code without a model_type": json.dumps({"auto_map": {"AutoConfig": "custom.MyConfig"}}),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_load_pretrained_on_a_malformed_config_raises_a_checkpoint_error(tmp_path, case, monkeypatch):
    from lowrank_cli import load_pretrained
    from lowrank_cli.errors import CheckpointError

    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked whether to run custom code"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(BAD_CONFIGS[case])
    with pytest.raises(CheckpointError, match=r"config\.json: cannot be read as a transformers config"):
        load_pretrained(folder)


@pytest.mark.parametrize("case", ["not JSON", "a JSON list", "a field of the wrong type"])
def test_calibrate_with_a_malformed_config_is_one_line(tmp_path, case):
    from test_calibration import tiny_model_folder

    folder, text = tiny_model_folder(tmp_path, head=False)
    (folder / "config.json").write_text(BAD_CONFIGS[case])
    stats = tmp_path / "stats.safetensors"
    assert_clean_failure(cli("calibrate", folder, "-o", stats, "--text", text, "--seq-len", 16), 1, str(folder))
    assert not stats.exists()


# --- 15: a full or read-only disk under calibrate, a memory cap under any command: one line -----------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_calibrate_onto_a_full_or_read_only_disk_is_one_line(tmp_path, monkeypatch, code):
    """Tests run as root, which a chmod 0o555 folder does not stop: the write itself fails instead."""
    import safetensors.torch
    from test_calibration import tiny_model_folder

    folder, text = tiny_model_folder(tmp_path, head=False)

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 8)  # a partial file, which must not be left behind
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    stats = tmp_path / "stats.safetensors"
    before = listing(tmp_path)
    result = cli("calibrate", folder, "-o", stats, "--text", text, "--seq-len", 16)
    assert_clean_failure(result, 1, str(stats), os.strerror(code))
    assert listing(tmp_path) == before


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_a_memory_cap_hit_while_reading_an_input_is_one_line(tmp_path, monkeypatch, error):
    source = save(tmp_path / "big.safetensors", {"big": torch.ones(1000, 1000)})
    real_empty = torch.empty

    def capped_empty(*shape, **kwargs):
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if int(np.prod(dims)) >= 10**6:
            raise error
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", capped_empty)
    assert_clean_failure(cli("analyze", source), 1, str(source), "'big'", "memory")
