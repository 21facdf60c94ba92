"""Sensitivity (lowrank calibrate): what each weight's error costs the model's output, and the budget that uses it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, cli, cli_json, file_metadata, load
from hypothesis import given
from hypothesis import strategies as st
from test_calibration import correlated_inputs, hand_moments, tiny_bert, tiny_model_folder

import lowrank_cli
from lowrank_cli.io.calibration import read_calibration, write_calibration
from lowrank_cli.io.publish import current_umask
from lowrank_cli.model.calibrate import Calibrator
from lowrank_cli.ops.samples import spread


class TinyNet(torch.nn.Module):
    """An embedding, a Linear, tanh, a Linear: every kind of weight the probe cuts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(20, 12)
        self.up = torch.nn.Linear(12, 16)
        self.down = torch.nn.Linear(16, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(self.embed(ids))))


def numpy_forward(weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    x = weights["embed.weight"][ids]
    hidden = np.tanh(x @ weights["up.weight"].T + weights["up.bias"])
    return hidden @ weights["down.weight"].T + weights["down.bias"]


def numpy_sensitivity(
    weights: dict, batches: list, probe: np.ndarray, name: str, inputs: np.ndarray | None, lookups=None
) -> float:
    """Cut `name` to half its params: of W·S with S·Sᵀ = E[xxᵀ] + λI, λ = 1e-6·tr/n, when inputs are given;
    of D^½·W with d = p + 0.1/V (p each row's share of the lookups) when an embedding's lookups are."""
    w = weights[name]
    m, n = w.shape
    r = max(1, m * n // (2 * (m + n)))
    left = np.eye(m)
    if inputs is None:
        factor = np.eye(n)
    else:
        moment = inputs.T @ inputs / len(inputs)
        factor = np.linalg.cholesky(moment + 1e-6 * np.trace(moment) / n * np.eye(n))
    if lookups is not None:
        counts = np.bincount(lookups, minlength=m).astype(np.float64)
        left = np.diag(np.sqrt(counts / counts.sum() + 0.1 / m))
    u, s, vh = np.linalg.svd(left @ w @ factor)
    cut = np.linalg.inv(left) @ (u[:, :r] * s[:r]) @ vh[:r] @ np.linalg.inv(factor)
    reference = numpy_forward(weights, probe)
    changed = numpy_forward({**weights, name: cut}, probe)
    loss = ((changed - reference) ** 2).sum() / (reference**2).sum()
    return loss / (s[r:] ** 2).sum()


def test_sensitivity_is_the_output_change_per_unit_of_the_cut_error():
    model = TinyNet().double().eval()
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 20, (4, 9), generator=generator) for _ in range(5)]
    probe = torch.randint(0, 20, (3, 7), generator=generator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Calibrator(model) as calibrator, torch.no_grad():
        for batch in batches:
            model(batch)
        tokens = calibrator.tokens
        measured = calibrator.measure_sensitivity(lambda: model(probe), tokens=probe.numel())
        assert calibrator.tokens == tokens  # the probe's runs add nothing to the statistics
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    ids = torch.cat([b.reshape(-1) for b in batches]).numpy()
    up_inputs = weights["embed.weight"][ids]
    down_inputs = np.tanh(up_inputs @ weights["up.weight"].T + weights["up.bias"])
    expected = {
        "embed.weight": numpy_sensitivity(weights, batches, probe.numpy(), "embed.weight", None, ids),
        "up.weight": numpy_sensitivity(weights, batches, probe.numpy(), "up.weight", up_inputs),
        "down.weight": numpy_sensitivity(weights, batches, probe.numpy(), "down.weight", down_inputs),
    }
    assert set(measured) == set(expected)
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, rel=1e-6), name
    for name, tensor in model.state_dict().items():  # every weight is back, bit for bit
        assert torch.equal(tensor, before[name]), name


def test_a_tied_head_is_measured_once_under_the_embedding_name():
    """GPT-2 style: the output head is the input embedding; cutting it changes both, so it counts once."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(6)
            self.embed = torch.nn.Embedding(20, 12)
            self.head = torch.nn.Linear(12, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)))

    model = Tied().double().eval()
    ids = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(7))
    with Calibrator(model) as calibrator, torch.no_grad():
        model(ids)
    measured = calibrator.measure_sensitivity(lambda: model(ids))
    assert set(measured) == {"embed.weight"}
    e = model.embed.weight.detach().numpy()
    r = 20 * 12 // (2 * 32)
    # cut as compress cuts the stored table: weighted by the rows' lookups, d = p + 0.1/V (linalg.whiten.RowWeights)
    counts = np.bincount(ids.numpy().reshape(-1), minlength=20)
    d = np.sqrt(counts / counts.sum() + 0.1 / 20)
    u, sigma, vh = np.linalg.svd(d[:, None] * e, full_matrices=False)
    cut = ((u[:, :r] * sigma[:r]) @ vh[:r]) / d[:, None]

    def forward(w):
        return np.tanh(w[ids.numpy()]) @ w.T

    y, y2 = forward(e), forward(cut)
    expected = ((y2 - y) ** 2).sum() / (y**2).sum() / (sigma[r:] ** 2).sum()
    assert measured["embed.weight"] == pytest.approx(expected, rel=1e-6)


def test_the_mask_leaves_padding_out_of_the_statistics():
    """A padded batch with its attention mask gives the moments of the two sequences run unpadded."""
    model = tiny_bert()
    generator = torch.Generator().manual_seed(8)
    long, short = torch.randint(5, 60, (1, 10), generator=generator), torch.randint(5, 60, (1, 6), generator=generator)
    expected = hand_moments(model, [long, short])
    ids = torch.cat([long, torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1)])
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with Calibrator(model) as calibrator, torch.no_grad():
        calibrator.mask = mask
        model(input_ids=ids, attention_mask=mask)
    assert calibrator.tokens == 16
    moments = calibrator.moments()
    for name, moment in expected.items():
        np.testing.assert_allclose(moments[f"{name}.weight"].numpy(), moment, rtol=1e-4, atol=1e-5)


def test_sensitivity_round_trips_through_the_statistics_file(tmp_path):
    model = TinyNet().eval()
    batch = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(5))
    with Calibrator(model) as calibrator, torch.no_grad():
        model(batch)
    calibrator.measure_sensitivity(lambda: model(batch), tokens=36)
    calibrator.save(tmp_path / "s.safetensors")
    stored = read_calibration(tmp_path / "s.safetensors")
    assert stored.sensitivity == calibrator.sensitivity and len(stored.sensitivity) == 3
    assert json.loads(file_metadata(tmp_path / "s.safetensors")["lowrank_calibration"])["probe_tokens"] == 36
    with Calibrator(model) as plain, torch.no_grad():
        model(batch)
    plain.save(tmp_path / "p.safetensors")  # no probe: a file without sensitivities reads as before
    assert read_calibration(tmp_path / "p.safetensors").sensitivity == {}


@pytest.fixture
def two_twins(tmp_path):
    """Two 64×48 weights with the same input; the budget must choose between them by sensitivity alone."""
    rng = np.random.default_rng(21)
    base = rng.standard_normal((64, 48)) * (0.9 ** np.arange(48))[None, :]
    weights = {"a.weight": torch.from_numpy(base).float(), "b.weight": torch.from_numpy(base[::-1].copy()).float()}
    x = correlated_inputs(400, 48, seed=22)
    moments = {"x": torch.from_numpy(x.T @ x / len(x))}
    keys = {"a.weight": "x", "b.weight": "x"}
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file(weights, str(path))
    return path, moments, keys, weights


@pytest.mark.parametrize("sensitive", ["a.weight", "b.weight"])
def test_compress_budget_spares_the_sensitive_weight(two_twins, tmp_path, sensitive):
    path, moments, keys, weights = two_twins
    stats = tmp_path / "s.safetensors"
    other = ({"a.weight", "b.weight"} - {sensitive}).pop()
    write_calibration(stats, moments, keys, tokens=400, sensitivity={sensitive: 100.0, other: 0.01}, probe_tokens=10)
    out = tmp_path / "c.safetensors"
    report = lowrank_cli.compress(path, out, budget=0.5, calibration=stats)
    assert report.options["budget_objective"] == "sensitivity"
    rows = {t.name: t for t in report.tensors}
    kept = {name: rows[name].rank if rows[name].rank is not None else 48 for name in rows}
    assert kept[sensitive] > kept[other], kept
    written = load(out)  # the budget holds on what was written
    params = sum(t.numel() for t in written.values())
    assert params <= 0.5 * 2 * 64 * 48
    plain = lowrank_cli.compress(path, tmp_path / "p.safetensors", budget=0.5, calibration=_without(stats, tmp_path))
    assert plain.options["budget_objective"] == "uniform"
    args = ("compress", path, "--budget", "0.5", "--force", "--calibration")
    result = cli(*args, _without(stats, tmp_path), "-o", tmp_path / "q.safetensors")
    assert result.exit_code == 0 and "has no sensitivities" in result.stderr
    result = cli(*args, stats, "-o", tmp_path / "q.safetensors")
    assert result.exit_code == 0 and "sensitivities" not in result.stderr


def _without(stats, tmp_path):
    """The same statistics, without sensitivities."""
    calibration = read_calibration(stats)
    out = tmp_path / "plain-stats.safetensors"
    moments, keys = {"x": calibration.moments["a.weight"]}, {"a.weight": "x", "b.weight": "x"}
    write_calibration(out, moments, keys, tokens=400, force=True)  # made again by each call: the same file
    return out


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_sensitivities_that_are_not_numbers(two_twins, tmp_path, bad):
    path, moments, keys, _ = two_twins
    stats = tmp_path / "s.safetensors"
    write_calibration(stats, moments, keys, tokens=400, sensitivity={"a.weight": bad}, probe_tokens=1)
    result = cli("compress", path, "-o", tmp_path / "c.safetensors", "--budget", "0.5", "--calibration", stats)
    assert_clean_failure(result, 1, "s.safetensors", "lowrank calibrate")
    assert not (tmp_path / "c.safetensors").exists()


def test_lowrank_calibrate_measures_every_linear_and_embedding(tmp_path):
    folder, text = tiny_model_folder(tmp_path, head=False)
    stats = tmp_path / "stats.safetensors"
    args = ("calibrate", folder, "--text", text, "--seq-len", "16", "--samples", "5", "--device", "cpu")
    document = cli_json(*args, "-o", stats)
    calibration = read_calibration(stats)
    checkpoint = load(folder / "model.safetensors")
    matrices = {k for k, v in checkpoint.items() if v.ndim == 2 and "LayerNorm" not in k}
    assert set(calibration.sensitivity) == matrices  # every Linear, the pooler and the three embeddings
    assert document["command"] == "calibrate" and document["output"] == str(stats)
    assert document["sensitivities"] == len(matrices)
    assert (document["samples"], document["tokens"], document["split"]) == (5, 5 * 16, "windows")  # a long line
    assert document["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert all(value > 0 for value in calibration.sensitivity.values())
    source = folder / "model.safetensors"
    report = lowrank_cli.compress(source, tmp_path / "c.safetensors", budget=0.6, calibration=stats)
    assert report.options["budget_objective"] == "sensitivity"
    predicted = lowrank_cli.analyze(source, budget=0.6, calibration=stats)  # analyze predicts the same ranks
    assert {t.name: t.rank for t in predicted.tensors} == {t.name: t.rank for t in report.tensors}
    budgeted = [t for t in report.tensors if t.status.value != "skipped"]  # the matrices, not biases and norms
    assert sum(t.params_after for t in budgeted) <= 0.6 * sum(t.params for t in budgeted)
    result = cli(*args, "-o", tmp_path / "plain.safetensors", "--no-sensitivity")
    assert result.exit_code == 0 and read_calibration(tmp_path / "plain.safetensors").sensitivity == {}
    result = cli(*args, "-o", tmp_path / "small.safetensors", "--probe-tokens", "32")  # two windows of 16
    assert result.exit_code == 0, result.output
    assert json.loads(file_metadata(tmp_path / "small.safetensors")["lowrank_calibration"])["probe_tokens"] == 32
    assert_clean_failure(cli(*args, "-o", tmp_path / "x.safetensors", "--probe-tokens", "0"), 2, "--probe-tokens")
    assert not (tmp_path / "x.safetensors").exists()


def test_lowrank_calibrate_on_a_gpt2_with_conv1d_and_a_tied_head(tmp_path):
    """Conv1D weights are stored (in, out); the head is the token embedding, stored once as wte."""
    transformers = pytest.importorskip("transformers")
    folder, text = tiny_model_folder(tmp_path, head=False)  # for its tokenizer and text
    config = transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(gpt2)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(gpt2)
    stats = tmp_path / "stats.safetensors"
    result = cli("calibrate", gpt2, "-o", stats, "--text", text, "--seq-len", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    calibration = read_calibration(stats)
    checkpoint = load(gpt2 / "model.safetensors")
    conv = {k for k, v in checkpoint.items() if v.ndim == 2 and (".attn." in k or ".mlp." in k)}
    assert len(conv) == 8 and conv <= calibration.transposed and conv <= set(calibration.moments)
    assert set(calibration.sensitivity) == conv | {"transformer.wte.weight", "transformer.wpe.weight"}
    report = lowrank_cli.compress(gpt2 / "model.safetensors", tmp_path / "c.safetensors", budget=0.6, calibration=stats)
    rows = {t.name: t for t in report.tensors}
    factored = [rows[name] for name in conv if rows[name].status.value == "factorized"]
    assert factored and all(t.output_error is not None for t in factored)
    budgeted = [t for t in report.tensors if t.status.value != "skipped"]
    assert sum(t.params_after for t in budgeted) <= 0.6 * sum(t.params for t in budgeted)


def test_lowrank_calibrate_by_lines(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, _ = tiny_model_folder(tmp_path, head=False)
    lines = ["the model reads", "", "every word of this text the model reads", "  this  "]
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines) + "\n")
    stats = tmp_path / "stats.safetensors"
    result = cli(
        "calibrate", folder, "-o", stats, "--text", text, "--split", "lines", "--seq-len", "6", "--no-sensitivity"
    )
    assert result.exit_code == 0, result.output
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    expected = sum(min(len(tokenizer(line)["input_ids"]), 6) for line in lines if line.strip())
    assert read_calibration(stats).tokens == expected == 5 + 6 + 3


@pytest.mark.parametrize(
    ("tokens", "samples", "expected"), [(48, None, 48), (50, None, 48), (1000, 4, 64), (1, None, 16)]
)
def test_lowrank_calibrate_counts_tokens(tmp_path, tokens, samples, expected):
    """Windows of 16 tokens: --tokens N takes about N/16 of them (at least one), --samples caps the count."""
    folder, text = tiny_model_folder(tmp_path, head=False)
    stats = tmp_path / "stats.safetensors"
    extra = ["--samples", str(samples)] if samples else []
    args = ("calibrate", folder, "-o", stats, "--text", text, "--seq-len", "16", "--tokens", str(tokens))
    result = cli(*args, *extra, "--no-sensitivity")
    assert result.exit_code == 0, result.output
    assert read_calibration(stats).tokens == expected


@given(count=st.integers(1, 50), size=st.integers(0, 200))
def test_spread_takes_samples_evenly_over_the_whole_text(count, size):
    items = list(range(size))
    chosen = spread(items, count)
    assert len(chosen) == min(count, size) and chosen == sorted(set(chosen))
    if size > count:  # evenly: the gaps differ by at most one, and the last stretch is reached
        gaps = np.diff(chosen + [size])
        assert gaps.max() - gaps.min() <= 1 and chosen[0] == 0


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("no tokenizer", 1, ["tokenizer", "missing"]),
        ("seq-len past the model", 2, ["--seq-len", "at most 64"]),
        ("output folder missing", 1, ["does not exist"]),
        ("text is a folder", 1, ["is a folder", "--text"]),
        ("text is binary", 2, ["not UTF-8", "--text"]),
        ("text is blank", 2, ["has no text", "--text"]),
        ("no model folder", 1, ["no such folder"]),
        ("tokens zero", 2, ["--tokens must be at least 1"]),
        ("samples zero", 2, ["--samples must be at least 1"]),
    ],
)
def test_calibrate_refuses_with_one_line(tmp_path, case, code, words):
    folder, text = tiny_model_folder(tmp_path, head=False)
    out = tmp_path / "stats.safetensors"
    args = ["calibrate", folder, "-o", out, "--text", text, "--seq-len", "16", "--no-sensitivity"]
    if case == "no tokenizer":
        bare = tmp_path / "bare"
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            (bare / name).write_bytes((folder / name).read_bytes())
        args[1] = bare
    elif case == "seq-len past the model":
        args[7] = "100"
    elif case == "output folder missing":
        out = tmp_path / "nowhere" / "stats.safetensors"
        args[3] = out
    elif case == "text is a folder":
        args[5] = tmp_path
    elif case == "text is binary":
        args[5] = tmp_path / "binary.txt"
        args[5].write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 10)
    elif case == "text is blank":
        args[5] = tmp_path / "blank.txt"
        args[5].write_text("\n  \n\t\n")
    elif case == "no model folder":
        args[1] = tmp_path / "absent"
    elif case == "tokens zero":
        args += ["--tokens", "0"]
    elif case == "samples zero":
        args += ["--samples", "0"]
    assert_clean_failure(cli(*args), code, *words)
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.glob(".*partial"))  # no temporary left either


def test_a_mask_of_another_shape_is_refused():
    model = tiny_bert()
    ids = torch.randint(5, 60, (2, 6), generator=torch.Generator().manual_seed(9))
    for shape in [(2, 5), (6, 2), (3, 99)]:
        with Calibrator(model) as calibrator, torch.no_grad():
            calibrator.mask = torch.ones(shape, dtype=torch.long)
            with pytest.raises(lowrank_cli.UsageError, match="calibrator.mask has shape"):
                model(input_ids=ids)


def test_analyze_with_statistics_says_its_spectra_are_of_the_whitened_matrix(two_twins, tmp_path):
    path, moments, keys, weights = two_twins
    stats = tmp_path / "s.safetensors"
    write_calibration(stats, moments, keys, tokens=400)
    assert stats.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # a normal file's mode, like every output
    document = json.loads(cli("analyze", path, "--calibration", stats, "--json").stdout)
    assert document["options"] == {"calibration": str(stats)}
    result = cli("analyze", path, "--calibration", stats)
    assert "spectra of W·S" in result.stdout
    assert "spectra of W·S" not in cli("analyze", path).stdout
    document = json.loads(cli("analyze", path, "--calibration", stats, "--budget", "0.5", "--json").stdout)
    assert document["options"]["budget_objective"] == "uniform"


def test_statistics_without_sensitivities_cut_every_matrix_to_the_same_share(tmp_path):
    """No sensitivities: each matrix keeps rank ⌊F·m·n/(m+n)⌋ (SVD-LLM's uniform ratio), whatever its
    spectrum; weighing the whitened spectra alone did worse than that on SmolLM2."""
    rng = np.random.default_rng(31)
    shapes = {"a.weight": (64, 48), "b.weight": (96, 48), "c.weight": (48, 128)}
    decays = {"a.weight": 0.5, "b.weight": 0.97, "c.weight": 0.8}  # very different spectra
    weights = {}
    for name, (m, n) in shapes.items():
        u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
        v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
        weights[name] = torch.from_numpy((u * decays[name] ** np.arange(min(m, n))) @ v.T).float()
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "m.safetensors"))
    moments = {name: torch.eye(n, dtype=torch.float64) for name, (m, n) in shapes.items()}
    stats = tmp_path / "s.safetensors"
    write_calibration(stats, moments, {name: name for name in shapes}, tokens=10)
    for fraction in (0.3, 0.6):
        report = lowrank_cli.compress(tmp_path / "m.safetensors", tmp_path / f"c{fraction}.safetensors",
                                      budget=fraction, calibration=stats)  # fmt: skip
        assert report.options["budget_objective"] == "uniform"
        ranks = {t.name: t.rank for t in report.tensors}
        assert ranks == {name: int(fraction * m * n // (m + n)) for name, (m, n) in shapes.items()}


def test_a_tensor_the_budget_keeps_whole_is_not_said_to_get_plain_svd(two_twins, tmp_path):
    path, moments, keys, weights = two_twins
    from safetensors.torch import save_file

    with_row = tmp_path / "with_row.safetensors"
    save_file({**weights, "row.weight": torch.ones(1, 8)}, str(with_row))  # rank 1 costs 9 > 8: only whole
    stats = tmp_path / "s.safetensors"
    write_calibration(stats, moments, keys, tokens=400)
    report = lowrank_cli.compress(with_row, tmp_path / "c.safetensors", budget=0.6, calibration=stats)
    row = {t.name: t for t in report.tensors}["row.weight"]
    assert row.status.value == "dense" and "plain SVD" not in (row.reason or "")


def test_calibrate_reports_progress_over_blocks_then_weights(tmp_path):
    folder, text = tiny_model_folder(tmp_path, head=False)
    calls = []
    lowrank_cli.calibrate(
        folder, tmp_path / "s.safetensors", text=text, seq_len=16, samples=5, batch_size=2, device="cpu",
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    model = tiny_bert()
    weights = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)
    }  # every Linear and embedding weight, once each
    total = model.config.num_hidden_layers + len(weights)  # one step per block, then one per weight probed
    assert [t for _, t in calls] == [total] * len(calls)
    assert [d for d, _ in calls] == list(range(1, total + 1)) + [total]  # each step, then the end


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_projected_estimate_agrees_with_the_exact_probe(tmp_path, kind):
    """The default estimate (one projected backward pass through the blocks) orders the weights as the
    reference does (one whole-model forward per cut weight), and is of its size: within the spread of
    its random projections (4 per sample, 30 samples: about 13 %). Windows: no padding, whose outputs
    the reference counts and the estimate leaves out."""
    from test_calibration import tiny_causal_folder

    folder = tiny_causal_folder(tmp_path, kind)
    text = tmp_path / "text.txt"
    text.write_text("the model reads every word of this text " * 60)
    options = dict(text=text, seq_len=16, split="windows", batch_size=32, probe_tokens=10_000)
    lowrank_cli.calibrate(folder, tmp_path / "exact.safetensors", exact_sensitivity=True, **options)
    lowrank_cli.calibrate(folder, tmp_path / "cheap.safetensors", **options)
    exact = read_calibration(tmp_path / "exact.safetensors").sensitivity
    cheap = read_calibration(tmp_path / "cheap.safetensors").sensitivity
    assert set(cheap) == set(exact) and len(exact) >= 10
    names = sorted(exact)
    assert _spearman([exact[n] for n in names], [cheap[n] for n in names]) > 0.9
    ratios = np.array([cheap[n] / exact[n] for n in names])
    assert ((ratios > 0.6) & (ratios < 1.6)).all(), dict(zip(names, ratios, strict=True))
