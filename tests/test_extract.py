"""`lowrank extract`: what goes into the adapter and what is skipped, the numbers it reports, the
factors' dtype, and every way it can fail (exit code, one line, no output, inputs untouched)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import (
    assert_clean_failure,
    by_name,
    cli,
    cli_json,
    energy_rank,
    geometric,
    listing,
    load,
    low_rank,
    raw_tensors,
    relative_error,
    save,
    sha256,
    singular_values,
    table_rows,
    tail_errors,
    with_spectrum,
)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _lora(adapter, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of a linear module as written: B (out, r), A (r, in)."""
    factors = load(adapter / WEIGHTS)
    return factors[f"base_model.model.{module}.lora_B.weight"], factors[f"base_model.model.{module}.lora_A.weight"]


def _config(adapter) -> dict:
    return json.loads((adapter / CONFIG).read_text(encoding="utf-8"))


def _delta(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """ΔW in float32, as the issue defines it."""
    return tuned.to(torch.float32) - base.to(torch.float32)


def _write(tmp_path, base: dict, tuned: dict):
    return save(tmp_path / "base.safetensors", base), save(tmp_path / "tuned.safetensors", tuned)


# --- a fine-tune with one of every case -----------------------------------------------------------


@pytest.fixture
def every_case(tmp_path):
    """A base/tuned pair holding one tensor for each reason extract gives, and three it can extract."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    base = {
        "proj.weight": randn(24, 16),
        "proj.bias": randn(24),
        "frozen.weight": randn(12, 16),
        "norm.weight": randn(16),
        "model.embed_tokens.weight": randn(40, 16),
        "conv.weight": randn(8, 3, 3, 3),
        "lm_head.weight": randn(40, 16),
        "only_base.weight": randn(8, 8),
        "steps": torch.arange(4),
    }
    tuned = dict(base)
    tuned["proj.weight"] = base["proj.weight"] + 0.1 * low_rank(24, 16, 3, seed=1)
    tuned["norm.weight"] = base["norm.weight"] + 0.01 * randn(16)
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 0.1 * low_rank(40, 16, 2, seed=2)
    tuned["conv.weight"] = base["conv.weight"] + 0.1 * low_rank(8, 27, 2, seed=3).reshape(8, 3, 3, 3)
    tuned["lm_head.weight"] = torch.cat([base["lm_head.weight"], randn(2, 16)])  # a resized vocabulary
    tuned["steps"] = torch.arange(4) + 1
    del tuned["only_base.weight"]
    tuned["only_tuned.weight"] = randn(6, 8)
    base_file, tuned_file = _write(tmp_path, base, tuned)
    return base_file, tuned_file, base, tuned


def _check_reasons(rows: dict[str, dict], base: dict, tuned: dict, *, embeddings: bool, conv: bool) -> None:
    """The skipped tensors and their reasons; `rows` maps name -> {"status", "reason"}."""
    skipped = {name: row["reason"] for name, row in rows.items() if row["status"] == "skipped"}
    assert skipped["only_base.weight"] == "only in BASE"
    assert skipped["only_tuned.weight"] == "only in TUNED"
    assert "shape" in skipped["lm_head.weight"]
    assert "40×16" in skipped["lm_head.weight"] and "42×16" in skipped["lm_head.weight"]
    assert skipped["lm_head.weight"].index("40×16") < skipped["lm_head.weight"].index("42×16")  # BASE, then TUNED
    assert "unchanged" in skipped["frozen.weight"] and "ΔW = 0" in skipped["frozen.weight"]
    assert "1-D" in skipped["proj.bias"] and "unchanged" in skipped["proj.bias"]
    assert rows["norm.weight"]["status"] == "carried" and "modules_to_save" in rows["norm.weight"]["reason"]
    assert "not floating point" in skipped["steps"]
    extracted = {"proj.weight"}
    if embeddings:
        extracted.add("model.embed_tokens.weight")
    else:
        reason = skipped["model.embed_tokens.weight"]
        assert "embedding" in reason and "--embeddings" in reason
    if conv:
        extracted.add("conv.weight")
    else:
        assert "conv" in skipped["conv.weight"] and "--conv" in skipped["conv.weight"]
    assert {name for name, row in rows.items() if row["status"] == "extracted"} == extracted
    assert set(rows) == set(base) | set(tuned)


def _norm_change(base: dict, tuned: dict) -> float:
    before, after = base["norm.weight"], tuned["norm.weight"]
    return float(torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before))


def test_skip_reasons_in_json(every_case, tmp_path):
    base_file, tuned_file, base, tuned = every_case
    adapter = tmp_path / "adapter"
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 3))
    _check_reasons(report, base, tuned, embeddings=False, conv=False)
    for row in report.values():
        if row["status"] == "skipped":
            assert row["rank"] is None and row["rel_error"] is None, row
    assert _config(adapter)["target_modules"] == ["proj"]
    written = load(adapter / WEIGHTS)
    assert set(written) == {f"base_model.model.proj.lora_{ab}.weight" for ab in "AB"} | {"base_model.model.norm.weight"}
    assert torch.equal(written["base_model.model.norm.weight"], tuned["norm.weight"])
    assert (_config(adapter)["modules_to_save"], _config(adapter)["lora_bias"]) == (["norm"], False)
    assert report["norm.weight"]["params_after"] == 16


def test_lora_only_says_how_much_a_tensor_left_out_changed(every_case, tmp_path):
    base_file, tuned_file, base, tuned = every_case
    adapter = tmp_path / "adapter"
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 3, "--lora-only"))
    row = report["norm.weight"]
    assert row["status"] == "skipped" and "left out" in row["reason"]
    number = re.search(r"changed by ([0-9.e+-]+)", row["reason"])
    assert number and float(number.group(1)) == pytest.approx(_norm_change(base, tuned), rel=1e-2)
    assert _config(adapter)["modules_to_save"] is None
    assert set(load(adapter / WEIGHTS)) == {f"base_model.model.proj.lora_{ab}.weight" for ab in "AB"}


def test_what_cannot_be_carried_says_why(tmp_path):
    """A bias of a target beside a target with no bias (lora_bias would break merging), the bias of a
    Linear whose weight did not change (modules_to_save would carry the whole matrix), and a norm whose
    name ends another module's (PEFT would wrap both)."""
    generator = torch.Generator().manual_seed(30)
    base = {
        "a.weight": torch.randn(8, 6, generator=generator),
        "a.bias": torch.randn(8, generator=generator),
        "b.weight": torch.randn(8, 8, generator=generator),
        "c.weight": torch.randn(4, 8, generator=generator),
        "c.bias": torch.randn(4, generator=generator),
        "norm.weight": torch.ones(8),
        "fc_norm.weight": torch.ones(8),
    }
    tuned = dict(base)
    for name in ("a", "b"):
        tuned[f"{name}.weight"] = base[f"{name}.weight"] + 0.1 * low_rank(*base[f"{name}.weight"].shape, 2, seed=31)
    for name in ("a.bias", "c.bias", "norm.weight"):
        tuned[name] = base[name] + 0.1
    base_file, tuned_file = _write(tmp_path, base, tuned)
    adapter = tmp_path / "adapter"

    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 2))
    assert report["a.bias"]["status"] == "skipped"
    assert "lora_bias needs a bias on every LoRA target" in report["a.bias"]["reason"]
    assert "b has none" in report["a.bias"]["reason"]
    assert report["c.bias"]["status"] == "skipped" and "the matrix c.weight" in report["c.bias"]["reason"]
    assert report["norm.weight"]["status"] == "skipped" and "fc_norm ends in norm" in report["norm.weight"]["reason"]
    config = _config(adapter)
    assert (config["lora_bias"], config["modules_to_save"], config["target_modules"]) == (False, None, ["a", "b"])


def test_skip_reasons_in_the_table(every_case, tmp_path):
    base_file, tuned_file, base, tuned = every_case
    result = cli("extract", base_file, tuned_file, "-o", tmp_path / "adapter", "--rank", 3)
    assert result.exit_code == 0, (result.stderr, result.exception)
    rows = {name: {"status": row["status"], "reason": row["note"]} for name, row in table_rows(result.stdout).items()}
    del rows["total"]
    _check_reasons(rows, base, tuned, embeddings=False, conv=False)
    assert rows["proj.weight"]["reason"] == ""


def test_embeddings_and_conv_opt_in(every_case, tmp_path):
    base_file, tuned_file, base, tuned = every_case
    adapter = tmp_path / "adapter"
    options = ["--max-error", 1e-4, "--embeddings", "--conv"]
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, *options))
    _check_reasons(report, base, tuned, embeddings=True, conv=True)
    expected = {}
    for name in ("proj.weight", "model.embed_tokens.weight", "conv.weight"):
        errors = tail_errors(singular_values(_delta(base[name], tuned[name])))
        expected[name] = next(r for r, e in enumerate(errors) if e <= 1e-4)
    assert expected == {"proj.weight": 3, "model.embed_tokens.weight": 2, "conv.weight": 2}
    assert {name: report[name]["rank"] for name in expected} == expected
    assert sorted(_config(adapter)["target_modules"]) == ["conv", "model.embed_tokens", "proj"]

    factors = load(adapter / WEIGHTS)
    # PEFT's Embedding: ΔW (vocab, dim) = (lora_embedding_B @ lora_embedding_A)ᵀ
    emb_a = factors["base_model.model.model.embed_tokens.lora_embedding_A"]
    emb_b = factors["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert (tuple(emb_a.shape), tuple(emb_b.shape)) == ((2, 40), (16, 2))
    delta = _delta(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])
    torch.testing.assert_close(emb_b @ emb_a, delta.T, atol=1e-5, rtol=0)  # (16, 2) @ (2, 40) -> (16, 40)
    # PEFT's Conv2d: lora_A a kh×kw conv (r, in, kh, kw), lora_B a 1×1 conv (out, r, 1, 1)
    conv_a = factors["base_model.model.conv.lora_A.weight"]
    conv_b = factors["base_model.model.conv.lora_B.weight"]
    assert (tuple(conv_a.shape), tuple(conv_b.shape)) == ((2, 3, 3, 3), (8, 2, 1, 1))
    delta = _delta(base["conv.weight"], tuned["conv.weight"]).reshape(8, 27)
    torch.testing.assert_close(conv_b.reshape(8, 2) @ conv_a.reshape(2, 27), delta, atol=1e-5, rtol=0)
    assert report["conv.weight"]["params_after"] == 2 * (8 + 27)
    assert report["model.embed_tokens.weight"]["params_after"] == 2 * (40 + 16)


def test_a_linear_in_an_embeddings_block_is_a_linear(tmp_path):
    """DeBERTa-v2's embeddings.embed_proj, MobileBERT's embeddings.embedding_transformation: Linear
    layers inside an `embeddings` block. Only the embedding table itself is an embedding."""
    generator = torch.Generator().manual_seed(20)
    base = {
        "embeddings.word_embeddings.weight": torch.randn(50, 16, generator=generator),
        "embeddings.embed_proj.weight": torch.randn(24, 16, generator=generator),
    }
    tuned = {
        "embeddings.word_embeddings.weight": base["embeddings.word_embeddings.weight"] + 0.1 * low_rank(50, 16, 2, 21),
        "embeddings.embed_proj.weight": base["embeddings.embed_proj.weight"] + 0.1 * low_rank(24, 16, 2, 22),
    }
    base_file, tuned_file = _write(tmp_path, base, tuned)
    adapter = tmp_path / "adapter"

    result = cli("extract", base_file, tuned_file, "-o", adapter, "--rank", 2, "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = by_name(json.loads(result.stdout))
    assert report["embeddings.word_embeddings.weight"]["status"] == "skipped"
    assert "--embeddings" in report["embeddings.word_embeddings.weight"]["reason"]
    assert report["embeddings.embed_proj.weight"]["status"] == "extracted"
    assert _config(adapter)["target_modules"] == ["embeddings.embed_proj"]
    b, a = _lora(adapter, "embeddings.embed_proj")
    delta = _delta(base["embeddings.embed_proj.weight"], tuned["embeddings.embed_proj.weight"])
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=0)


# --- the numbers it reports -----------------------------------------------------------------------


@pytest.fixture
def approximate(tmp_path):
    """Deltas that rank 3 cannot carry exactly: a decaying spectrum, and rank 5 plus noise."""
    generator = torch.Generator().manual_seed(4)
    base = {"a.weight": torch.randn(30, 20, generator=generator), "b.weight": torch.randn(16, 40, generator=generator)}
    tuned = {
        "a.weight": base["a.weight"] + with_spectrum(30, 20, geometric(20, 0.6), seed=5),
        "b.weight": base["b.weight"]
        + 0.1 * low_rank(16, 40, 5, seed=6)
        + 1e-3 * torch.randn(16, 40, generator=generator),
    }
    return (*_write(tmp_path, base, tuned), base, tuned)


def test_reported_error_is_measured_on_the_factors(approximate, tmp_path):
    base_file, tuned_file, base, tuned = approximate
    adapter = tmp_path / "adapter"
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 3))
    for name in ("a.weight", "b.weight"):
        delta = _delta(base[name], tuned[name])
        m, n = delta.shape
        b, a = _lora(adapter, name.removesuffix(".weight"))
        assert (tuple(b.shape), tuple(a.shape)) == ((m, 3), (3, n))
        error = relative_error(delta, b, a)
        row = report[name]
        assert row["status"] == "extracted" and row["rank"] == 3
        assert row["rel_error"] == pytest.approx(error, rel=1e-6)
        assert row["rel_error"] == pytest.approx(tail_errors(singular_values(delta))[3], rel=1e-5)  # Eckart–Young
        assert row["kept"] == pytest.approx(1.0 - error**2, rel=1e-6)
        assert row["params_after"] == 3 * (m + n)
        # lora_B = U_r·diag(S_r), lora_A = V_rᵀ: A's rows orthonormal, B's column norms the σ_i
        a64, b64 = a.to(torch.float64).numpy(), b.to(torch.float64).numpy()
        np.testing.assert_allclose(a64 @ a64.T, np.eye(3), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(b64, axis=0), singular_values(delta)[:3], rtol=1e-5)


def test_json_totals_are_the_sums(approximate, tmp_path):
    base_file, tuned_file, base, tuned = approximate
    adapter = tmp_path / "adapter"
    result = cli("extract", base_file, tuned_file, "-o", adapter, "--rank", 3, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)  # stdout holds one JSON document and nothing else
    assert document["command"] == "extract"
    errors = {}
    for name in ("a.weight", "b.weight"):
        b, a = _lora(adapter, name.removesuffix(".weight"))
        errors[name] = relative_error(_delta(base[name], tuned[name]), b, a)
    params = sum(base[name].numel() for name in errors)
    params_after = sum(3 * sum(base[name].shape) for name in errors)
    assert params_after == sum(t.numel() for t in load(adapter / WEIGHTS).values())
    totals = document["totals"]
    assert totals["params"] == params
    assert totals["params_after"] == params_after
    assert totals["savings"] == pytest.approx(1.0 - params_after / params)
    assert totals["bytes_after"] == (adapter / WEIGHTS).stat().st_size
    assert totals["max_rel_error"] == pytest.approx(max(errors.values()), rel=1e-6)
    assert sorted(listing(adapter)) == [CONFIG, WEIGHTS]


def test_the_table_says_the_adapter_size_against_what_it_adapts(approximate, tmp_path):
    base_file, tuned_file, base, _ = approximate
    adapter = tmp_path / "adapter"
    result = cli("extract", base_file, tuned_file, "-o", adapter, "--rank", 3)
    assert result.exit_code == 0, result.stderr
    params_after = sum(t.numel() for t in load(adapter / WEIGHTS).values())
    adapted = sum(base[name].numel() for name in ("a.weight", "b.weight"))
    line = next(line for line in result.stdout.splitlines() if line.startswith("adapter:"))
    assert f"{params_after:,} params ({100 * params_after / adapted:.1f}% of the adapted tensors)" in line


@pytest.mark.parametrize("rank", [3, 12])
def test_an_adapter_as_big_as_what_it_adapts_says_so(approximate, tmp_path, rank):
    """a: 30×20, b: 16×40 (1,240 params). Rank 3: 318 LoRA params (26%); rank 12: 1,272 (over 100%)."""
    base_file, tuned_file, base, _ = approximate
    adapter = tmp_path / "adapter"
    result = cli("extract", base_file, tuned_file, "-o", adapter, "--rank", rank)
    assert result.exit_code == 0, result.stderr
    params_after = sum(t.numel() for t in load(adapter / WEIGHTS).values())
    adapted = sum(base[name].numel() for name in ("a.weight", "b.weight"))
    assert (params_after >= adapted / 2) == (rank == 12)
    assert ("note: the adapter is half the size" in result.stderr) == (rank == 12)  # a note: on stderr
    assert "saves little" not in result.stdout  # stdout is the table
    document = cli_json("extract", base_file, tuned_file, "-o", tmp_path / "again", "--rank", rank)
    assert any("saves little" in note for note in document["options"].get("notes", [])) == (rank == 12)


def test_bytes_after_is_the_adapter_file(every_case, tmp_path):
    base_file, tuned_file, _, _ = every_case
    adapter = tmp_path / "adapter"
    document = cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 2, "--embeddings", "--conv")
    assert document["totals"]["bytes_after"] == (adapter / WEIGHTS).stat().st_size
    in_adapter = [t for t in document["tensors"] if t["status"] in ("extracted", "carried")]
    assert {t["name"] for t in in_adapter if t["status"] == "carried"} == {"norm.weight"}
    assert document["totals"]["params_after"] == sum(t.numel() for t in load(adapter / WEIGHTS).values())
    assert document["totals"]["params"] == sum(int(np.prod(t["shape"])) for t in in_adapter)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99, 0.999])
def test_energy_keeps_that_share_of_delta(approximate, tmp_path, fraction):
    base_file, tuned_file, base, tuned = approximate
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", tmp_path / "adapter", "--energy", fraction))
    for name in ("a.weight", "b.weight"):
        s = singular_values(_delta(base[name], tuned[name]))
        assert report[name]["rank"] == energy_rank(s, fraction), name
        assert report[name]["kept"] >= fraction * (1 - 1e-6)


@pytest.mark.parametrize("max_error", [0.3, 0.1, 0.01])
def test_max_error_bounds_the_error_of_delta(approximate, tmp_path, max_error):
    base_file, tuned_file, base, tuned = approximate
    adapter = tmp_path / "adapter"
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--max-error", max_error))
    for name in ("a.weight", "b.weight"):
        errors = tail_errors(singular_values(_delta(base[name], tuned[name])))
        assert report[name]["rank"] == next(r for r, e in enumerate(errors) if e <= max_error), name
        b, a = _lora(adapter, name.removesuffix(".weight"))
        assert relative_error(_delta(base[name], tuned[name]), b, a) <= max_error * (1 + 1e-6)


def test_rank_is_clamped(approximate, tmp_path):
    base_file, tuned_file, base, tuned = approximate
    adapter = tmp_path / "adapter"
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 100))
    assert report["a.weight"]["rank"] == 20 and report["b.weight"]["rank"] == 16
    for name in ("a.weight", "b.weight"):
        b, a = _lora(adapter, name.removesuffix(".weight"))
        assert relative_error(_delta(base[name], tuned[name]), b, a) < 1e-5


def test_include_exclude_and_base_model(approximate, tmp_path):
    base_file, tuned_file, _, _ = approximate
    adapter = tmp_path / "adapter"
    report = by_name(
        cli_json(
            "extract", base_file, tuned_file, "-o", adapter, "--rank", 2, "--exclude", "a.*", "--base-model", "org/base"
        )
    )
    assert set(report) == {"b.weight"}
    config = _config(adapter)
    assert config["target_modules"] == ["b"]
    assert config["base_model_name_or_path"] == "org/base"
    assert (config["r"], config["lora_alpha"]) == (2, 2)

    options = ["--force", "--rank", 2, "--include", "a.*"]
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, *options))
    assert set(report) == {"a.weight"}
    assert _config(adapter)["target_modules"] == ["a"]
    assert _config(adapter)["base_model_name_or_path"] == str(base_file.parent.resolve())  # BASE's folder


# --- dtypes ---------------------------------------------------------------------------------------


def test_bfloat16_factors_and_their_error(tmp_path):
    generator = torch.Generator().manual_seed(7)
    base = {"w.weight": torch.randn(48, 32, generator=generator)}
    tuned = {"w.weight": base["w.weight"] + 0.1 * low_rank(48, 32, 3, seed=8)}
    base_file, tuned_file = _write(tmp_path, base, tuned)
    delta = _delta(base["w.weight"], tuned["w.weight"])

    adapter = tmp_path / "bf16"
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 3, "--dtype", "bfloat16"))
    row = report["w.weight"]
    stored = raw_tensors(adapter / WEIGHTS)
    assert {code for code, _, _ in stored.values()} == {"BF16"}
    b, a = _lora(adapter, "w")
    assert b.dtype == a.dtype == torch.bfloat16
    error = relative_error(delta, b, a)
    assert error > 1e-4  # bfloat16 rounding, far above what float32 factors make
    assert row["rel_error"] == pytest.approx(error, rel=1e-6)
    assert row["kept"] == pytest.approx(1 - error**2, rel=1e-9)
    assert (adapter / WEIGHTS).stat().st_size < (3 * (48 + 32)) * 4  # 2 bytes a number, plus a header

    f32 = tmp_path / "f32"
    exact = by_name(cli_json("extract", base_file, tuned_file, "-o", f32, "--rank", 3, "--dtype", "float32"))
    assert {code for code, _, _ in raw_tensors(f32 / WEIGHTS).values()} == {"F32"}
    assert exact["w.weight"]["rel_error"] < 1e-5


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_keep_stores_the_tuned_dtype(tmp_path, dtype):
    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    generator = torch.Generator().manual_seed(9)
    base = {"w.weight": torch.randn(24, 16, generator=generator).to(torch_dtype)}
    tuned = {"w.weight": (base["w.weight"].float() + 0.5 * low_rank(24, 16, 2, seed=10)).to(torch_dtype)}
    base_file, tuned_file = _write(tmp_path, base, tuned)
    adapter = tmp_path / "adapter"
    row = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 2))["w.weight"]
    assert {code for code, _, _ in raw_tensors(adapter / WEIGHTS).values()} == {dtype}
    assert row["dtype"] == dtype
    b, a = _lora(adapter, "w")
    error = relative_error(_delta(base["w.weight"], tuned["w.weight"]), b, a)
    assert row["rel_error"] == pytest.approx(error, rel=1e-6)


# --- the quality gate -----------------------------------------------------------------------------


def test_fail_above(tmp_path):
    generator = torch.Generator().manual_seed(11)
    base = {"w.weight": torch.randn(32, 24, generator=generator), "v.weight": torch.randn(16, 24, generator=generator)}
    tuned = {
        "w.weight": base["w.weight"] + with_spectrum(32, 24, [8, 7, 6, 5, 4, 3, 2, 1], seed=12),  # rank 8
        "v.weight": base["v.weight"] + 0.1 * low_rank(16, 24, 2, seed=13),  # rank 2: exact
    }
    base_file, tuned_file = _write(tmp_path, base, tuned)
    error = tail_errors(singular_values(_delta(base["w.weight"], tuned["w.weight"])))[2]
    assert error > 0.5

    result = cli("extract", base_file, tuned_file, "-o", tmp_path / "gate", "--rank", 2, "--fail-above", error * 0.9)
    assert result.exit_code == 3, (result.stdout, result.stderr, result.exception)
    assert "'w.weight'" in result.stderr
    assert "'v.weight'" not in result.stderr

    result = cli(
        "extract", base_file, tuned_file, "-o", tmp_path / "gate", "--force", "--rank", 2, "--fail-above", error * 1.1
    )
    assert result.exit_code == 0, (result.stderr, result.exception)


# --- failures -------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    generator = torch.Generator().manual_seed(14)
    base = {"w.weight": torch.randn(12, 10, generator=generator), "n.weight": torch.randn(12, generator=generator)}
    tuned = {"w.weight": base["w.weight"] + low_rank(12, 10, 2, seed=15), "n.weight": base["n.weight"]}
    return _write(tmp_path, base, tuned)


def _untouched(folder, before: list[str], inputs: dict) -> None:
    """No DIR, no temporary .DIR.* entry, and the inputs bit for bit as they were."""
    assert listing(folder) == before
    for path, digest in inputs.items():
        assert sha256(path) == digest, path


def _snapshot(folder, *paths):
    return listing(folder), {path: sha256(path) for path in paths}


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ([], ["--rank"]),
        (["--rank", 2, "--energy", 0.9], ["--rank", "--energy"]),
        (["--max-error", 0.1, "--budget", 0.5], ["--max-error", "--budget"]),
        (["--rank", 0], ["--rank"]),
        (["--rank", -3], ["--rank"]),
        (["--energy", 0], ["--energy"]),
        (["--energy", 1.5], ["--energy"]),
        (["--max-error", 1], ["--max-error"]),
        (["--max-error", -0.1], ["--max-error"]),
        (["--budget", 0], ["--budget"]),
        (["--budget", 1], ["--budget"]),
        (["--rank", 2, "--dtype", "int8"], ["--dtype"]),
        (["--rank", 2, "--method", "magic"], ["--method"]),
        (["--rank", 2, "--fail-above", -1], ["--fail-above"]),
        (["--rank", 2, "--device", "tpu"], ["--device"]),
    ],
    ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else None,
)
def test_usage_errors(pair, tmp_path, options, words):
    base_file, tuned_file = pair
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "-o", tmp_path / "adapter", *options)
    assert_clean_failure(result, 2, *words)
    _untouched(tmp_path, before, inputs)


@pytest.mark.parametrize("options", [["--rank", "two"], ["--energy", "most"]], ids=lambda v: " ".join(v))
def test_unparseable_values_exit_2(pair, tmp_path, options):
    base_file, tuned_file = pair
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "-o", tmp_path / "adapter", *options)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    _untouched(tmp_path, before, inputs)


def test_output_is_required(pair, tmp_path):
    base_file, tuned_file = pair
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "--rank", 2)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "--output" in result.stderr or "-o" in result.stderr
    _untouched(tmp_path, before, inputs)


@pytest.mark.parametrize("which", ["base", "tuned"])
def test_missing_input(pair, tmp_path, which):
    base_file, tuned_file = pair
    missing = tmp_path / "missing.safetensors"
    args = (missing, tuned_file) if which == "base" else (base_file, missing)
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", *args, "-o", tmp_path / "adapter", "--rank", 2)
    assert_clean_failure(result, 1, str(missing))
    _untouched(tmp_path, before, inputs)


@pytest.mark.parametrize("policy", [["--rank", 2], ["--budget", 0.5], ["--energy", 0.9]], ids=lambda v: v[0])
def test_tuned_identical_to_base(tmp_path, policy):
    generator = torch.Generator().manual_seed(16)
    weights = {"w.weight": torch.randn(12, 10, generator=generator), "n.weight": torch.randn(12, generator=generator)}
    base_file, tuned_file = _write(tmp_path, weights, weights)
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "-o", tmp_path / "adapter", *policy)
    assert_clean_failure(result, 1, str(tuned_file))
    _untouched(tmp_path, before, inputs)


def test_only_one_d_changes_is_nothing_to_extract(tmp_path):
    generator = torch.Generator().manual_seed(17)
    base = {"w.weight": torch.randn(12, 10, generator=generator), "n.weight": torch.randn(12, generator=generator)}
    tuned = {"w.weight": base["w.weight"], "n.weight": base["n.weight"] + 1}
    base_file, tuned_file = _write(tmp_path, base, tuned)
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "-o", tmp_path / "adapter", "--rank", 2)
    assert_clean_failure(result, 1, str(tuned_file))
    _untouched(tmp_path, before, inputs)


def test_a_policy_no_stored_factors_meet_names_the_module_it_keeps_out(pair, tmp_path):
    """w.weight changed: 'no module weight differs' was false when the policy kept it out."""
    base_file, tuned_file = pair
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "-o", tmp_path / "adapter", "--max-error", "1e-12")
    assert_clean_failure(result, 1, "1 module weight(s) differ", "'w.weight'", "miss the error target 1e-12")
    assert "no module weight differs" not in result.stderr
    _untouched(tmp_path, before, inputs)


def test_output_exists_needs_force(pair, tmp_path):
    base_file, tuned_file = pair
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "keep.txt").write_text("mine")
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "-o", adapter, "--rank", 2)
    assert_clean_failure(result, 1, str(adapter), "--force")
    _untouched(tmp_path, before, inputs)
    assert listing(adapter) == ["keep.txt"]

    result = cli("extract", base_file, tuned_file, "-o", adapter, "--rank", 2, "--force")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert listing(adapter) == [CONFIG, WEIGHTS]
    assert listing(tmp_path) == before


def test_output_is_a_file(pair, tmp_path):
    base_file, tuned_file = pair
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    before, inputs = _snapshot(tmp_path, base_file, tuned_file, target)
    result = cli("extract", base_file, tuned_file, "-o", target, "--rank", 2, "--force")
    assert_clean_failure(result, 1, str(target))
    _untouched(tmp_path, before, inputs)


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize("target", ["base", "tuned", "folder"])
def test_output_is_an_input(pair, tmp_path, target, force):
    base_file, tuned_file = pair
    out = {"base": base_file, "tuned": tuned_file, "folder": tmp_path}[target]
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "-o", out, "--rank", 2, *(["--force"] if force else []))
    assert_clean_failure(result, 2, str(out))
    _untouched(tmp_path, before, inputs)


@pytest.mark.parametrize("policy", [["--rank", 2], ["--budget", 0.5]], ids=lambda v: v[0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("side", ["tuned", "base"])
def test_nan_or_inf_in_a_weight(tmp_path, policy, bad, side):
    generator = torch.Generator().manual_seed(18)
    base = {"a.weight": torch.randn(12, 10, generator=generator), "z.weight": torch.randn(12, 10, generator=generator)}
    tuned = {name: w + low_rank(12, 10, 2, seed=19) for name, w in base.items()}
    broken = tuned if side == "tuned" else base
    broken["z.weight"] = broken["z.weight"].clone()
    broken["z.weight"][3, 4] = bad
    base_file, tuned_file = _write(tmp_path, base, tuned)
    before, inputs = _snapshot(tmp_path, base_file, tuned_file)
    result = cli("extract", base_file, tuned_file, "-o", tmp_path / "adapter", *policy)
    assert_clean_failure(result, 1, "z.weight", str(tuned_file if side == "tuned" else base_file))
    _untouched(tmp_path, before, inputs)


def test_budget_spends_on_the_largest_squared_error_of_delta(tmp_path):
    """extract's budget minimizes Σ‖ΔW − BA‖² (absolute), not compress's Σ‖ΔW − BA‖²/‖ΔW‖.

    ΔA: 20 singular values of σ² = 10 (‖ΔA‖ = √200); ΔB: two of σ² = 3 (‖ΔB‖ = √6). Rank 1 each
    costs 80 params; F = 0.15 of 800 allows one more term (40). Its absolute gain is 10 for A and 3
    for B, so A gets it; weighted by 1/‖ΔW‖ it would be 10/14.1 = 0.71 for A against 3/2.45 = 1.22
    for B, and B would.
    """
    delta_a = with_spectrum(20, 20, np.full(20, np.sqrt(10.0)), seed=1)
    delta_b = with_spectrum(20, 20, np.full(2, np.sqrt(3.0)), seed=2)
    base = {"a.weight": low_rank(20, 20, 20, seed=3), "b.weight": low_rank(20, 20, 20, seed=4)}
    tuned = {"a.weight": base["a.weight"] + delta_a, "b.weight": base["b.weight"] + delta_b}
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "tuned.safetensors", tuned)
    args = (tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-o", tmp_path / "ad", "--budget", 0.15)
    rows = by_name(cli_json("extract", *args))
    assert (rows["a.weight"]["rank"], rows["b.weight"]["rank"]) == (2, 1)
    written = load(tmp_path / "ad" / WEIGHTS)
    assert sum(t.numel() for t in written.values()) == 120 <= 0.15 * 800


def test_json_totals_bytes_are_the_files_on_disk(tmp_path):
    """bytes: TUNED's file(s); bytes_after: the adapter's weights file, as written (docs/json.md)."""
    base = save(tmp_path / "base.safetensors", {"q.weight": low_rank(16, 12, 3), "norm.weight": torch.ones(16)})
    tuned_folder = tmp_path / "tuned"
    tuned_folder.mkdir()
    save(tuned_folder / "model-00001-of-00002.safetensors", {"q.weight": low_rank(16, 12, 3, seed=1)})
    save(tuned_folder / "model-00002-of-00002.safetensors", {"norm.weight": torch.full((16,), 2.0)})
    out = tmp_path / "adapter"
    report = cli_json("extract", base, tuned_folder, "-o", out, "--rank", 2)
    shard_sizes = sum(path.stat().st_size for path in tuned_folder.glob("*.safetensors"))
    assert report["totals"]["bytes"] == shard_sizes
    assert report["totals"]["bytes_after"] == (out / "adapter_model.safetensors").stat().st_size
