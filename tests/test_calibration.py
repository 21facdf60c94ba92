"""Activation-aware factors: calibration statistics, whitened factorization, output error."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, cli, cli_json, file_metadata, load, save, table_rows
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_cli
from lowrank_cli.io.calibration import Calibration, read_calibration, write_calibration
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.whiten import whitener
from lowrank_cli.ops.calibrate import Calibrator
from lowrank_cli.ops.factoring import NO_STATISTICS, ZERO_MOMENT, factor_tensor
from lowrank_cli.ops.hfmodel import checkpoint_names
from lowrank_cli.ops.settings import Settings


def correlated_inputs(tokens: int, n: int, seed: int = 0) -> np.ndarray:
    """Inputs with a decaying feature spectrum and a mean, like a layer's activations."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((n, n)) * (0.8 ** (np.arange(n) * 40 / n))[None, :]
    return rng.standard_normal((tokens, n)) @ mixing.T + 0.3


def output_error_np(w: np.ndarray, b: np.ndarray, a: np.ndarray, x: np.ndarray) -> float:
    """‖(W − BA)Xᵀ‖_F / ‖WXᵀ‖_F directly on the inputs: no second moment, no Cholesky."""
    w, b, a, x = (v.astype(np.float64) for v in (w, b, a, x))
    return float(np.linalg.norm((w - b @ a) @ x.T) / np.linalg.norm(w @ x.T))


def predicted_errors(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """√(Σ_{i>r} σ_i² / Σ σ_i²) of W·L with L the Cholesky factor of XᵀX/t, for every r."""
    moment = x.T @ x / len(x)
    factor = np.linalg.cholesky(moment)
    s = np.linalg.svd(w.astype(np.float64) @ factor, compute_uv=False)
    tail = np.cumsum((s**2)[::-1])[::-1]
    return np.sqrt(np.append(tail, 0.0) / tail[0])


def factors(w, x, policy, method="exact", transposed=False):
    moment = torch.from_numpy(x.T @ x / len(x))
    matrix = torch.from_numpy(w.T.copy() if transposed else w).to(torch.float64)
    calibration = Calibration({"w": moment}, transposed={"w"} if transposed else set())
    outcome = factor_tensor(matrix, policy, Settings(method=method), calibration, name="w", stored=torch.float64)
    if outcome.b is None:
        return outcome, None, None
    return outcome, outcome.b.numpy(), outcome.a.numpy()


def test_output_error_equals_the_spectrum_and_numpy():
    w = np.random.default_rng(1).standard_normal((48, 40))
    x = correlated_inputs(400, 40)
    predicted = predicted_errors(w, x)
    for rank in (1, 5, 12, 20):
        outcome, b, a = factors(w, x, RankPolicy(rank=rank))
        measured = output_error_np(w, b, a, x)
        assert measured == pytest.approx(predicted[rank], rel=1e-5)
        assert outcome.output_error == pytest.approx(measured, rel=1e-9)
        assert outcome.rel_error == pytest.approx(np.linalg.norm(w - b @ a) / np.linalg.norm(w), rel=1e-9)


def test_whitened_beats_plain_svd_on_the_output():
    w = np.random.default_rng(2).standard_normal((48, 40))
    x = correlated_inputs(400, 40, seed=3)
    _, b, a = factors(w, x, RankPolicy(rank=8))
    u, s, vh = np.linalg.svd(w)
    plain = output_error_np(w, u[:, :8] * s[:8], vh[:8], x)
    assert output_error_np(w, b, a, x) < 0.7 * plain


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("bound", [0.3, 0.1, 0.02])
def test_max_error_bounds_the_output_error(method, bound):
    w = np.random.default_rng(4).standard_normal((300, 280))
    x = correlated_inputs(1200, 280, seed=5)
    outcome, b, a = factors(w, x, RankPolicy(max_error=bound), method=method)
    assert output_error_np(w, b, a, x) <= bound * (1 + 1e-9)
    predicted = predicted_errors(w, x)
    smallest = int(np.argmax(predicted <= bound))
    assert smallest <= outcome.decision.rank <= smallest + 2  # the randomized basis may need a term or two more


@settings(max_examples=15, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), tokens=st.integers(1, 60), bound=st.floats(0.01, 0.9))
def test_the_bound_holds_on_any_moment(m, n, tokens, bound):
    """Also with fewer tokens than inputs: a singular second moment, damped to factor."""
    w = np.random.default_rng(m * n).standard_normal((m, n))
    x = correlated_inputs(tokens, n, seed=tokens)
    outcome = factors(w, x, RankPolicy(max_error=bound))[0]
    if outcome.b is not None:
        assert np.isfinite(outcome.b.numpy()).all() and np.isfinite(outcome.a.numpy()).all()
        assert output_error_np(w, outcome.b.numpy(), outcome.a.numpy(), x) <= bound * (1 + 1e-9)


def test_dead_features_and_a_zero_moment():
    w = np.random.default_rng(6).standard_normal((20, 16))
    x = correlated_inputs(200, 16)
    x[:, 3] = x[:, 9] = 0.0  # features that never fire: C is singular
    outcome, b, a = factors(w, x, RankPolicy(rank=4))
    assert np.isfinite(a).all()
    measured = output_error_np(w, b, a, x)
    assert outcome.output_error == pytest.approx(measured, rel=1e-9)
    u, s, vh = np.linalg.svd(w)
    assert measured < output_error_np(w, u[:, :4] * s[:4], vh[:4], x)
    zero = factor_tensor(
        torch.from_numpy(w),
        RankPolicy(rank=4),
        Settings(),
        Calibration({"w": torch.zeros(16, 16)}),
        name="w",
        stored=torch.float64,
    )
    assert zero.note == ZERO_MOMENT and zero.output_error is None
    s = np.linalg.svd(w, compute_uv=False)
    assert zero.rel_error == pytest.approx(np.sqrt((s[4:] ** 2).sum() / (s**2).sum()), rel=1e-9)
    missing = factor_tensor(
        torch.from_numpy(w), RankPolicy(rank=4), Settings(), Calibration({}), name="w", stored=torch.float64
    )
    assert missing.note == NO_STATISTICS


def test_damping_grows_until_cholesky_succeeds():
    moment = torch.zeros(6, 6, dtype=torch.float64)
    moment[0, 0] = 1.0  # rank one
    found = whitener(moment)
    assert found is not None and found.damping >= 1e-6 / 6
    assert torch.allclose(found.factor @ found.factor.T, moment + found.damping * torch.eye(6, dtype=torch.float64))
    assert whitener(torch.zeros(4, 4)) is None


def test_transposed_layer():
    """GPT-2's Conv1D stores W as (in, out): the moment belongs to the rows."""
    w = np.random.default_rng(7).standard_normal((24, 30))  # (out, in)
    x = correlated_inputs(300, 30, seed=8)
    outcome, b, a = factors(w, x, RankPolicy(rank=6), transposed=True)
    assert b.shape == (30, 6) and a.shape == (6, 24)
    assert output_error_np(w, (b @ a).T, np.eye(30), x) == pytest.approx(predicted_errors(w, x)[6], rel=1e-5)


# --- checkpoints and statistics files -------------------------------------------------------------


@pytest.fixture
def model_files(tmp_path):
    rng = np.random.default_rng(9)
    weights = {
        "layer.q.weight": torch.from_numpy(rng.standard_normal((64, 48))).float(),
        "layer.k.weight": torch.from_numpy(rng.standard_normal((64, 48))).float(),
        "layer.out.weight": torch.from_numpy(rng.standard_normal((48, 64))).float(),
        "embed.weight": torch.from_numpy(rng.standard_normal((100, 48))).float(),
    }
    inputs = {"q": correlated_inputs(500, 48, seed=10), "out": correlated_inputs(500, 64, seed=11)}
    moments = {key: torch.from_numpy(x.T @ x / len(x)) for key, x in inputs.items()}
    keys = {"layer.q.weight": "q", "layer.k.weight": "q", "layer.out.weight": "out"}
    stats = tmp_path / "stats.safetensors"
    write_calibration(stats, moments, keys, tokens=500, text_sha256="ab" * 32)
    return save(tmp_path / "model.safetensors", weights), stats, weights, inputs


def test_load_calibration_maps_every_weight(model_files):
    _, stats, _, inputs = model_files
    moments = lowrank_cli.load_calibration(stats)
    assert set(moments) == {"layer.q.weight", "layer.k.weight", "layer.out.weight"}
    x = inputs["q"]
    np.testing.assert_allclose(moments["layer.k.weight"].numpy(), x.T @ x / len(x), rtol=1e-6, atol=1e-6)
    assert read_calibration(stats).tokens == 500


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_compress_with_calibration(model_files, tmp_path, method):
    path, stats, weights, inputs = model_files
    out = tmp_path / "out.safetensors"
    report = lowrank_cli.compress(path, out, max_error=0.2, method=method, calibration=stats)
    rows = {t.name: t for t in report.tensors}
    dense = tmp_path / "dense.safetensors"
    lowrank_cli.expand(out, dense)
    expanded = load(dense)
    for name, x in (
        ("layer.q.weight", inputs["q"]),
        ("layer.k.weight", inputs["q"]),
        ("layer.out.weight", inputs["out"]),
    ):
        w, approx = weights[name].numpy(), expanded[name].numpy()
        measured = output_error_np(w, approx, np.eye(w.shape[1]), x)
        assert measured <= 0.2 + 1e-6
        assert rows[name].output_error == pytest.approx(measured, rel=1e-4, abs=1e-6)
        assert rows[name].rel_error == pytest.approx(np.linalg.norm(w - approx) / np.linalg.norm(w), rel=1e-4)
    assert NO_STATISTICS in rows["embed.weight"].reason and rows["embed.weight"].output_error is None
    record = json.loads(file_metadata(out)["lowrank"])
    assert record["calibration"]["activation_aware"] is True and record["calibration"]["tokens"] == 500


def test_cli_compress_and_analyze_show_the_output_error(model_files, tmp_path):
    path, stats, weights, inputs = model_files
    report = cli_json("analyze", path, "--rank", "8", "--calibration", stats, "--json")
    row = {t["name"]: t for t in report["tensors"]}["layer.out.weight"]
    assert row["output_error"] == pytest.approx(
        predicted_errors(weights["layer.out.weight"].numpy(), inputs["out"])[8], rel=1e-4
    )
    result = cli("compress", path, "-o", tmp_path / "c.safetensors", "--rank", "8", "--calibration", stats)
    assert result.exit_code == 0, result.output
    assert "output error" in result.stdout


def test_statistics_of_another_model(model_files, tmp_path):
    path, _, _, _ = model_files
    other = tmp_path / "other.safetensors"
    write_calibration(other, {"x": torch.eye(48)}, {"unrelated.weight": "x"}, tokens=1)
    assert_clean_failure(cli("compress", path, "--rank", "4", "--calibration", other), 1, str(other), "--calibration")
    wrong = tmp_path / "wrong.safetensors"
    write_calibration(wrong, {"x": torch.eye(5)}, {"layer.q.weight": "x"}, tokens=1)
    assert_clean_failure(cli("compress", path, "--rank", "4", "--calibration", wrong), 1, "layer.q.weight")
    # the same kind of error, one class: statistics that do not fit this model
    for stats in (other, wrong):
        with pytest.raises(lowrank_cli.CheckpointError):
            lowrank_cli.compress(path, tmp_path / "c.safetensors", rank=4, calibration=stats)
    assert not (tmp_path / "model.lowrank.safetensors").exists()
    assert_clean_failure(cli("compress", path, "--rank", "4", "--calibration", path), 1, "lowrank calibrate")


def test_extract_with_calibration(model_files, tmp_path):
    path, stats, weights, inputs = model_files
    rng = np.random.default_rng(12)
    tuned = {name: w + 0.1 * torch.from_numpy(rng.standard_normal(w.shape)).float() for name, w in weights.items()}
    tuned_path = save(tmp_path / "tuned.safetensors", tuned)
    report = lowrank_cli.extract(path, tuned_path, tmp_path / "adapter", max_error=0.3, calibration=stats)
    adapter = load(tmp_path / "adapter" / "adapter_model.safetensors")
    row = {t.name: t for t in report.tensors}["layer.out.weight"]
    b = adapter["base_model.model.layer.out.lora_B.weight"].numpy()
    a = adapter["base_model.model.layer.out.lora_A.weight"].numpy()
    delta = (tuned["layer.out.weight"] - weights["layer.out.weight"]).numpy()
    measured = output_error_np(delta, b, a, inputs["out"])
    assert measured <= 0.3 + 1e-6 and row.output_error == pytest.approx(measured, rel=1e-4)
    # the table shows the output error beside the weight error, as compress's does
    args = (path, tuned_path, "-o", tmp_path / "adapter2", "--max-error", "0.3", "--calibration", stats)
    result = cli("extract", *args)
    assert result.exit_code == 0, result.stderr
    rows = table_rows(result.stdout)
    assert float(rows["layer.out.weight"]["output error"]) == pytest.approx(measured, rel=1e-2)
    # analyze --diff with the same statistics reads the ranks extract takes off the spectra of ΔW·S
    change = lowrank_cli.analyze([path, tuned_path], diff=True, max_error=0.3, calibration=stats)
    extracted = {t.name: t for t in report.tensors}
    for t in change.tensors:
        if t.name in ("layer.q.weight", "layer.k.weight", "layer.out.weight"):
            assert t.rank == extracted[t.name].rank and t.output_error <= 0.3 and t.rel_error is None


# --- the Calibrator and lowrank calibrate on a tiny BERT ---------------------------------------------


def tiny_bert(head: bool = False):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model_class = transformers.BertForSequenceClassification if head else transformers.BertModel
    return model_class(config).eval()


def hand_moments(model, batches):
    """E[x xᵀ] of every Linear's input, from the stored activations (no Calibrator code)."""
    seen: dict[str, list[np.ndarray]] = {}
    handles = [
        module.register_forward_hook(
            lambda mod, inp, out, name=name: seen.setdefault(name, []).append(
                inp[0].reshape(-1, inp[0].shape[-1]).double().numpy()
            )
        )
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    return {name: np.concatenate(xs).T @ np.concatenate(xs) / sum(len(x) for x in xs) for name, xs in seen.items()}


def test_calibrator_matches_a_hand_written_loop(tmp_path):
    model = tiny_bert()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 60, (3, 10), generator=generator) for _ in range(4)]
    expected = hand_moments(model, batches)
    with Calibrator(model) as calibrator, torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    moments = calibrator.moments()
    assert set(moments) == {f"{name}.weight" for name in expected}
    for name, moment in expected.items():
        np.testing.assert_allclose(moments[f"{name}.weight"].numpy(), moment, rtol=1e-5, atol=1e-6)
    q, k = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight"
    assert moments[q] is moments[k]  # one input, one sum
    assert calibrator.tokens == 4 * 3 * 10
    calibrator.save(tmp_path / "s.safetensors")
    stored = lowrank_cli.load_calibration(tmp_path / "s.safetensors")
    np.testing.assert_allclose(stored[q].numpy(), expected[q.removesuffix(".weight")], rtol=1e-5, atol=1e-6)
    assert len({id(stored[name]) for name in stored}) < len(stored)


def test_checkpoint_names_with_a_task_head_prefix():
    keys = ["bert.encoder.layer.0.attention.self.query.weight", "classifier.weight", "bert.pooler.dense.weight"]
    modules = ["encoder.layer.0.attention.self.query", "pooler.dense", "classifier"]
    assert checkpoint_names(modules, keys, "bert") == {
        "encoder.layer.0.attention.self.query": keys[0], "pooler.dense": keys[2], "classifier": keys[1],
    }  # fmt: skip
    # the other way round: a head model ("bert.…") reading a bare checkpoint; another prefix is no match
    bare = ["encoder.layer.0.attention.self.query.weight", "roberta.pooler.dense.weight"]
    heads = ["bert.encoder.layer.0.attention.self.query", "bert.pooler.dense"]
    assert checkpoint_names(heads, bare, "bert") == {heads[0]: bare[0]}


def tiny_model_folder(tmp_path, head: bool):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    tiny_bert(head).save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        set(["the", "model", "reads", "every", "word", "of", "this", "text"])
    )
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    # vocab=, not vocab_file=: transformers 5 ignores vocab_file and builds a 5-token tokenizer
    transformers.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the model reads every word of this text " * 40)
    return folder, text


@pytest.mark.parametrize("head", [False, True])
def test_lowrank_calibrate(tmp_path, head):
    folder, text = tiny_model_folder(tmp_path, head)
    stats = tmp_path / "stats.safetensors"
    result = cli(
        "calibrate",
        folder,
        "-o",
        stats,
        "--text",
        text,
        "--seq-len",
        "16",
        "--samples",
        "5",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    cells = [line.split("│")[1:3] for line in result.stdout.splitlines() if "│" in line]
    rows = {name.strip(): value.strip() for name, value in cells}
    assert rows["samples"] == f"5 (windows), {5 * 16} tokens" and rows["wrote"] == str(stats)  # a table on stdout
    calibration = read_calibration(stats)
    keys = set(load(folder / "model.safetensors"))
    assert set(calibration.moments) <= keys and "pooler.dense.weight" in {
        k.removeprefix("bert.") for k in calibration.moments
    }
    assert calibration.tokens == 5 * 16
    report = lowrank_cli.compress(folder / "model.safetensors", tmp_path / "c.safetensors", rank=4, calibration=stats)
    assert any(t.output_error is not None for t in report.tensors)


def test_calibrate_without_transformers(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    text = tmp_path / "t.txt"
    text.write_text("words")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert_clean_failure(
        cli("calibrate", folder, "-o", tmp_path / "s.safetensors", "--text", text),
        1,
        "pip install 'lowrank[calibrate]'",
    )


@pytest.mark.parametrize("content", [b'{"command": "analyze"}\n', b"", b"\x00" * 3])
def test_statistics_that_are_not_safetensors(model_files, tmp_path, content):
    # A JSON report or a truncated file passed as STATS: safe_open raises SafetensorError, not OSError.
    path, _, _, _ = model_files
    stats = tmp_path / "report.json"
    stats.write_bytes(content)
    result = cli("compress", path, "-o", tmp_path / "c.safetensors", "--rank", "4", "--calibration", stats)
    assert_clean_failure(result, 1, "report.json", "lowrank calibrate")
    assert not (tmp_path / "c.safetensors").exists()
    assert stats.read_bytes() == content
