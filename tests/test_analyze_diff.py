"""`lowrank analyze BASE TUNED --diff`: the spectra of each change ΔW = W_tuned − W_base, the ranks
that hold 90/99 % of it, and what extract would need; every figure recomputed here with numpy."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import (
    assert_clean_failure,
    by_name,
    cli,
    cli_json,
    energy_rank,
    load,
    numerical_rank,
    save,
    singular_values,
    table_rows,
    tail_errors,
    with_spectrum,
)

import lowrank_cli

# float32 ΔW: σ (and the errors read off them) are good to a few ulps of σ_1, times the size
TOLERANCE = 64 * float(np.finfo(np.float32).eps)
UPDATE = [3.0, 1.5, 1.0, 0.3]  # σ of the rank-4 update: 90 % of its energy in 2 directions, 99 % in 3
Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


@pytest.fixture
def fine_tune(tmp_path):
    """A base model and a fine-tune of it: a rank-4 update of known σ on q_proj, a rank-2 one on the
    embedding, a rank-1 one on a matrix no LoRA can adapt, up_proj and the norm unchanged, a tensor
    only in BASE and one only in TUNED."""
    generator = torch.Generator().manual_seed(0)
    base = {
        Q: torch.randn(64, 48, generator=generator),
        UP: torch.randn(96, 48, generator=generator),
        EMBED: torch.randn(100, 48, generator=generator),
        "model.norm.weight": torch.ones(48),
        "model.mix": torch.randn(8, 8, generator=generator),  # a matrix, but no module's weight
        "model.old_head.weight": torch.randn(4, 48, generator=generator),
    }
    tuned = {name: value.clone() for name, value in base.items() if name != "model.old_head.weight"}
    tuned[Q] += with_spectrum(64, 48, UPDATE, seed=1)
    tuned[EMBED] += with_spectrum(100, 48, [2.0, 0.5], seed=2)
    tuned["model.mix"] += with_spectrum(8, 8, [1.0], seed=3)
    tuned["model.new_head.weight"] = torch.randn(3, 48, generator=generator)
    return save(tmp_path / "base.safetensors", base), save(tmp_path / "tuned.safetensors", tuned)


def _delta_sigma(base_path, tuned_path, name: str) -> np.ndarray:
    """σ of ΔW as the test computes it: the float32 difference, its SVD in float64."""
    return singular_values(load(tuned_path)[name] - load(base_path)[name])


def test_energy_ranks_of_a_known_rank_update(fine_tune):
    base, tuned = fine_tune
    report = lowrank_cli.analyze([base, tuned], diff=True)
    rows = {t.name: t for t in report.tensors}
    for name in (Q, EMBED):
        s = _delta_sigma(base, tuned, name)
        assert rows[name].rank_90 == energy_rank(s, 0.9)
        assert rows[name].rank_99 == energy_rank(s, 0.99)
        assert rows[name].numerical_rank == numerical_rank(load(tuned)[name] - load(base)[name])
        np.testing.assert_allclose(rows[name].singular_values, s, rtol=0, atol=TOLERANCE * s[0])
    assert (rows[Q].rank_90, rows[Q].rank_99, rows[Q].numerical_rank) == (2, 3, 4)  # what UPDATE was built to give
    assert rows[UP].numerical_rank == 0 and rows[UP].reason == "unchanged (ΔW = 0)"
    assert rows["model.norm.weight"].status == lowrank_cli.Status.skipped
    assert report.sources == [str(base), str(tuned)]


def test_a_policy_gives_the_rank_error_and_adapter_size_extract_would(fine_tune, tmp_path):
    base, tuned = fine_tune
    report = cli_json("analyze", base, tuned, "--diff", "--energy", "0.9")
    rows = by_name(report)
    adapter = 0
    for name in (Q, EMBED):
        s = _delta_sigma(base, tuned, name)
        rank = energy_rank(s, 0.9)
        m, n = rows[name]["shape"]
        assert rows[name]["status"] == "factorized" and rows[name]["rank"] == rank
        assert rows[name]["rel_error"] == pytest.approx(tail_errors(s)[rank], abs=TOLERANCE)
        assert rows[name]["kept"] == pytest.approx(1 - tail_errors(s)[rank] ** 2, abs=TOLERANCE)
        assert rows[name]["params_after"] == rank * (m + n)
        adapter += rank * (m + n)
    for name in (UP, "model.norm.weight", "model.mix"):
        assert rows[name]["status"] == "skipped" and rows[name]["params_after"] == 0 and rows[name]["rank"] is None
    assert rows["model.mix"]["numerical_rank"] == 1  # its spectrum is still described
    assert rows["model.mix"]["reason"].startswith("extract has no LoRA for it: not a module weight")
    assert report["totals"]["params_after"] == adapter
    assert report["totals"]["params"] == 64 * 48 + 100 * 48  # the matrices in the adapter
    assert report["options"]["diff"] is True and report["policy"] == {"energy": 0.9}
    assert "extract leaves it out by default: embedding (pass --embeddings)" in rows[EMBED]["reason"]

    extracted = lowrank_cli.extract(base, tuned, tmp_path / "adapter", energy=0.9, embeddings=True)
    written = {t.name: t for t in extracted.tensors if t.status == lowrank_cli.Status.extracted}
    assert {name: t.rank for name, t in written.items()} == {name: rows[name]["rank"] for name in (Q, EMBED)}
    assert sum(t.params_after for t in written.values()) == adapter


def test_a_budget_is_shared_as_extract_shares_it(fine_tune, tmp_path):
    base, tuned = fine_tune
    rows = by_name(cli_json("analyze", base, tuned, "--diff", "--budget", "0.05"))
    extracted = lowrank_cli.extract(base, tuned, tmp_path / "adapter", budget=0.05, embeddings=True)
    ranks = {t.name: t.rank for t in extracted.tensors if t.status == lowrank_cli.Status.extracted}
    assert ranks == {name: rows[name]["rank"] for name in (Q, EMBED)}


def test_tensors_in_one_checkpoint_only_are_notes(fine_tune):
    base, tuned = fine_tune
    result = cli("analyze", base, tuned, "--diff", "--json")
    assert result.exit_code == 0, result.stderr
    notes = lowrank_cli.analyze([base, tuned], diff=True).options["notes"]
    assert notes == [
        f"1 tensor only in BASE ({base}), left out: 'model.old_head.weight'",
        f"1 tensor only in TUNED ({tuned}), left out: 'model.new_head.weight'",
    ]
    for note in notes:
        assert f"note: {note}" in " ".join(result.stderr.split())  # on stderr, folded at any width
    assert "model.new_head.weight" not in by_name(lowrank_cli.analyze([base, tuned], diff=True).to_dict())


def test_the_note_on_opt_in_matrices_names_the_argument_as_its_caller_spells_it(fine_tune):
    """The embedding is in the totals only with --embeddings: the library's note says `embeddings`,
    the CLI's `--embeddings`."""
    base, tuned = fine_tune
    notes = lowrank_cli.analyze([base, tuned], diff=True, energy=0.9).options["notes"]
    words = "the totals count 1 matrix that extract adapts only with %s or %s, as extract with them would"
    words += f" (first: '{EMBED}')"
    assert notes[-1] == words % ("embeddings", "conv")
    result = cli("analyze", base, tuned, "--diff", "--energy", "0.9", "--json")
    assert result.exit_code == 0, result.stderr
    assert words % ("--embeddings", "--conv") in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["options"]["notes"][-1] == words % ("--embeddings", "--conv")


def test_a_shape_that_differs_is_one_line_naming_the_tensor(tmp_path):
    base = save(tmp_path / "base.safetensors", {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(8, 4)})
    tuned = save(tmp_path / "tuned.safetensors", {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(4, 8)})
    assert_clean_failure(cli("analyze", base, tuned, "--diff"), 1, "'b.weight'", "8×4", "4×8", "--exclude")
    with pytest.raises(lowrank_cli.CheckpointError, match=r"tensor 'b.weight' is 8×4 .* but 4×8"):
        lowrank_cli.analyze([base, tuned], diff=True)
    rows = by_name(cli_json("analyze", base, tuned, "--diff", "--exclude", "b.weight"))
    assert list(rows) == ["a.weight"]


def test_models_with_no_tensor_in_common_are_refused_not_zero_params(tmp_path):
    """No ΔW at all: not 'extract would need 0 adapter params' (extract refuses such a pair), one line, exit 1."""
    base = save(tmp_path / "a.safetensors", {"x.weight": torch.randn(16, 12)})
    other = save(tmp_path / "b.safetensors", {"y.weight": torch.randn(16, 12)})
    result = cli("analyze", base, other, "--diff", "--rank", 4)
    assert_clean_failure(result, 1, str(base), str(other), "no tensor name in common")
    assert_clean_failure(cli("extract", base, other, "-o", tmp_path / "adapter", "--rank", 4), 1, str(other))


def test_when_extract_would_write_no_adapter_analyze_says_so(fine_tune):
    base, _ = fine_tune
    result = cli("analyze", base, base, "--diff", "--rank", 4)
    assert result.exit_code == 0, result.stderr
    assert "would write no adapter" in result.stdout and "0 adapter params" not in result.stdout
    assert "no matrix that extract can adapt differs" in result.stderr
    document = cli_json("analyze", base, base, "--diff", "--rank", 4)
    assert document["totals"]["params"] == document["totals"]["params_after"] == 0
    assert any("write no adapter" in note for note in document["options"]["notes"])


def test_max_error_0_is_refused_as_extract_refuses_it(fine_tune, tmp_path):
    """Factors rounded to float never hold ΔW with no error: extract kept every module out and then said
    'no module weight differs'; both commands now refuse 0 and name what to give instead."""
    base, tuned = fine_tune
    for args in (["analyze", base, tuned, "--diff"], ["extract", base, tuned, "-o", tmp_path / "adapter"]):
        assert_clean_failure(cli(*args, "--max-error", 0), 2, "--max-error 0", "--energy 1")
    assert not (tmp_path / "adapter").exists()
    rows = by_name(cli_json("extract", base, tuned, "-o", tmp_path / "adapter", "--energy", 1))
    assert rows[Q]["status"] == "extracted" and rows[Q]["rank"] == len(UPDATE)  # ΔW at its full rank, 4


@pytest.mark.parametrize("count", [1, 3])
def test_diff_needs_exactly_two_checkpoints(fine_tune, count):
    paths = [fine_tune[0], fine_tune[1], fine_tune[0]][:count]
    assert_clean_failure(cli("analyze", *paths, "--diff"), 2, "--diff", f"got {count}")


def test_table_and_csv_show_the_change(fine_tune):
    base, tuned = fine_tune
    s = _delta_sigma(base, tuned, Q)
    result = cli("analyze", base, tuned, "--diff", "--energy", "0.99")
    assert result.exit_code == 0, result.stderr
    assert "ΔW" in result.stdout.splitlines()[0]
    rows = table_rows(result.stdout)
    q_row = next(row for name, row in rows.items() if "q_proj" in name)
    assert (q_row["r@90%"], q_row["r@99%"], q_row["rank"]) == tuple(str(energy_rank(s, f)) for f in (0.9, 0.99, 0.99))
    assert q_row["adapter params"] == f"{energy_rank(s, 0.99) * (64 + 48):,}"
    assert "lowrank extract with this policy would need" in result.stdout

    result = cli("analyze", base, tuned, "--diff", "--csv")
    assert result.exit_code == 0, result.stderr
    table = {row["name"]: row for row in csv.DictReader(io.StringIO(result.stdout))}
    assert set(table) == {Q, UP, EMBED, "model.norm.weight", "model.mix"}
    assert (table[Q]["rank_90"], table[Q]["rank_99"]) == (str(energy_rank(s, 0.9)), str(energy_rank(s, 0.99)))
