"""evaluate and compress --fidelity block by block (lowrank_cli.model.blockwise) give the whole model's figures.

The reference for every figure is the whole-model path (evaluate.Evaluator on models that transformers
loads whole), which is independent of the block runner. Tiny models are built from configs; the real
model is SmolLM2-135M-Instruct (the `smollm2` fixture), skipped where it is not installed.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli
from test_evaluate import compressed, line_text, tiny_folder

import lowrank_cli
from lowrank_cli.io.checkpoint import open_checkpoint
from lowrank_cli.model import blockwise
from lowrank_cli.model.blockwise import BlockwiseEvaluator, measure_candidate, open_evaluator
from lowrank_cli.model.evaluate import CACHE_BYTES, Evaluator, load_candidate, make_evaluator, model_samples
from lowrank_cli.model.fidelity import search
from lowrank_cli.ops.factoring import skip_reason
from lowrank_cli.ops.hfmodel import load_model
from lowrank_cli.ops.settings import Split

transformers = pytest.importorskip("transformers")

FIGURES = ("fidelity", "kl_mean", "perplexity_reference", "perplexity_candidate", "top1_agreement")


def whole_model_figures(folder: Path, candidate: Path, text: Path, **sampling) -> dict[str, float]:
    """The figures of the whole-model path: both models loaded by transformers / load_pretrained, run whole."""
    reference, tokenizer = load_model(folder, "cpu", "test")
    found = model_samples(reference, tokenizer, folder, text, **sampling)
    evaluator = make_evaluator(reference, tokenizer, found, folder, batch_size=16, device="cpu")
    return evaluator.measure(load_candidate(folder, candidate, type(reference), "cpu"))


@pytest.mark.parametrize("kind", ["causal-lm", "masked-lm", "encoder"])
def test_block_by_block_equals_the_whole_model(tmp_path, kind):
    folder = tiny_folder(tmp_path, kind)
    candidate = compressed(folder, tmp_path)
    text = line_text(tmp_path / "eval.txt")
    evaluator, _ = open_evaluator(folder, text, feature="test", batch_size=16, device="cpu")
    assert isinstance(evaluator, BlockwiseEvaluator)
    result = lowrank_cli.evaluate(folder, candidate, text=text)
    whole = whole_model_figures(folder, candidate, text)
    for figure, value in whole.items():
        assert getattr(result, figure) == pytest.approx(value, rel=1e-5, abs=1e-6), figure
    assert result.fidelity < 0.999  # the cut is visible


def test_logits_in_chunks_of_one_position_give_the_same_figures(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(folder, tmp_path)
    text = line_text(tmp_path / "eval.txt")
    whole = lowrank_cli.evaluate(folder, candidate, text=text)
    chunks = []
    real_head = blockwise.BlockRunner.head

    def head(self, hidden, positions=None):
        chunks.append(positions)
        return real_head(self, hidden, positions)

    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 1)  # one position of the batch at a time
    monkeypatch.setattr(blockwise.BlockRunner, "head", head)
    chunked = lowrank_cli.evaluate(folder, candidate, text=text)
    assert chunks and all(p.stop - p.start == 1 for p in chunks)
    for figure in FIGURES:
        assert getattr(chunked, figure) == pytest.approx(getattr(whole, figure), rel=1e-6), figure


# --- compress --fidelity: each trial against the reference, which no trial changes -------------------------

VOCABULARY = 9000  # above 8,192: 16,384 tokens' log-probabilities are more than evaluate would keep (CACHE_BYTES)


def big_vocabulary_lm(tmp_path: Path) -> tuple[Path, Path]:
    """(a tiny Llama of VOCABULARY tokens with a tokenizer of them all, a text of some 20,000 tokens)."""
    words = [f"w{index}" for index in range(VOCABULARY - 5)]
    folder = tmp_path / "lm"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
    model.eval().save_pretrained(folder)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab=str(vocab)).save_pretrained(folder)
    generator = random.Random(0)
    text = tmp_path / "search.txt"
    text.write_text(" ".join(generator.choices(words[:2000], k=20000)))
    return folder, text


def independent_fidelity(reference: Evaluator, folder: Path, ranks: dict[str, int | None]) -> float:
    """The trial's model built apart: W′ from a float64 SVD of each stored W at the trial's rank, put into a
    model loaded whole by transformers, measured by the whole-model evaluator (which reruns the reference)."""
    model, _ = load_model(folder, "cpu", "test")
    weights = dict(model.named_parameters())
    with open_checkpoint(folder) as checkpoint, torch.no_grad():
        for name, rank in ranks.items():
            if rank is None:
                continue
            w = checkpoint.read(name).to(torch.float64).numpy()
            u, s, vh = np.linalg.svd(w, full_matrices=False)
            weights[name].copy_(torch.from_numpy((u[:, :rank] * s[:rank]) @ vh[:rank]))
    return reference.measure(model)["fidelity"]


def test_every_trial_measures_its_own_model_and_leaves_the_reference_alone(tmp_path):
    folder, text = big_vocabulary_lm(tmp_path)
    sampling = dict(split=Split.windows)
    evaluator, found = open_evaluator(folder, text, feature="test", batch_size=16, device="cpu", **sampling)
    assert isinstance(evaluator, BlockwiseEvaluator)
    assert found.tokens * VOCABULARY * 4 > CACHE_BYTES  # the whole-model evaluator would rerun the reference
    kept = [hidden.states.clone() for hidden in evaluator.final]
    with open_checkpoint(folder) as checkpoint:
        names = [entry.name for entry in checkpoint.entries.values() if skip_reason(entry) is None]
        assert "model.embed_tokens.weight" in names  # the stem and the (tied) head are cut too
        budget, fidelity, trials = search(checkpoint, evaluator, 0.2, names=names, calibration=None, device="cpu")
    assert all(torch.equal(hidden.states, before) for hidden, before in zip(evaluator.final, kept, strict=True))
    reference, tokenizer = load_model(folder, "cpu", "test")
    whole = make_evaluator(
        reference, tokenizer, model_samples(reference, tokenizer, folder, text, **sampling), folder,
        batch_size=16, device="cpu",
    )  # fmt: skip
    assert whole._cache is None  # nothing cached: each measure reruns the reference (the case of the old bug)
    assert len(trials) >= 5 and min(trial.fidelity for trial in trials) < 0.2 < max(trial.fidelity for trial in trials)
    for trial in trials:
        assert trial.fidelity == pytest.approx(independent_fidelity(whole, folder, trial.ranks), abs=2e-4)
    assert fidelity == next(trial.fidelity for trial in trials if trial.budget == budget) >= 0.2


# --- the real model -----------------------------------------------------------------------------------------


def test_smollm2_block_by_block_equals_the_whole_model(smollm2, tmp_path):
    """A compressed SmolLM2 (bfloat16, tied head) measured block by block and whole, on 1,024 tokens of prose."""
    candidate = tmp_path / "smol.b80"
    lowrank_cli.compress(smollm2, candidate, budget=0.8, include="model.layers.*")
    text = tmp_path / "text.txt"
    text.write_text(Path(lowrank_cli.__file__).parent.joinpath("model", "blockwise.py").read_text())
    sampling = dict(tokens=1024, split=Split.windows)
    result = lowrank_cli.evaluate(smollm2, candidate, text=text, **{**sampling, "split": "windows"})
    whole = whole_model_figures(smollm2, candidate, text, **sampling)
    assert result.kl_mean > 0.01  # the cut is visible
    # both run in bfloat16; the head's logits in chunks of positions may round apart in the last bit
    assert result.kl_mean == pytest.approx(whole["kl_mean"], rel=0.02)
    assert result.perplexity_reference == pytest.approx(whole["perplexity_reference"], rel=0.01)
    assert result.perplexity_candidate == pytest.approx(whole["perplexity_candidate"], rel=0.01)
    assert result.top1_agreement == pytest.approx(whole["top1_agreement"], abs=0.01)
    assert math.isclose(result.fidelity, math.exp(-result.kl_mean), rel_tol=1e-12)


def test_measure_candidate_runs_the_candidate_by_blocks(tmp_path):
    folder = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(folder, tmp_path)
    text = line_text(tmp_path / "eval.txt")
    evaluator, _ = open_evaluator(folder, text, feature="test", batch_size=16, device="cpu")
    itself = measure_candidate(evaluator, folder, folder)
    assert itself["kl_mean"] == pytest.approx(0.0, abs=1e-6) and itself["top1_agreement"] == 1.0
    assert measure_candidate(evaluator, folder, candidate)["kl_mean"] > 1e-4


def test_trials_of_a_model_run_whole_equal_those_run_by_blocks(tmp_path, monkeypatch):
    """A model the runner does not run (a task head) is searched whole: the same trials measure the same, and
    the reference's weights are put back after every trial."""
    folder = tiny_folder(tmp_path, "causal-lm")
    text = line_text(tmp_path / "eval.txt")

    def trials_of(evaluator):
        with open_checkpoint(folder) as checkpoint:
            names = [entry.name for entry in checkpoint.entries.values() if skip_reason(entry) is None]
            return search(checkpoint, evaluator, 0.5, names=names, calibration=None, device="cpu")[2]

    by_blocks = trials_of(open_evaluator(folder, text, feature="test", batch_size=16, device="cpu")[0])
    monkeypatch.setattr(blockwise, "BLOCKWISE_KINDS", ())
    whole, _ = open_evaluator(folder, text, feature="test", batch_size=16, device="cpu")
    assert isinstance(whole, Evaluator)
    before = {name: tensor.clone() for name, tensor in whole.reference.state_dict().items()}
    trials = trials_of(whole)
    assert [trial.budget for trial in trials] == [trial.budget for trial in by_blocks] and len(trials) >= 5
    for trial, other in zip(trials, by_blocks, strict=True):
        assert trial.ranks == other.ranks and trial.fidelity == pytest.approx(other.fidelity, rel=1e-5, abs=1e-6)
    assert all(torch.equal(tensor, before[name]) for name, tensor in whole.reference.state_dict().items())


# --- the native libraries' memory: a process-wide setting, the CLI's choice, never the library's ----------------

CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def _no_libc(*args, **kwargs):
    raise AssertionError("glibc's malloc was changed")


def test_the_library_leaves_the_callers_process_settings_alone(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(folder, tmp_path)
    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    monkeypatch.setattr("ctypes.util.find_library", _no_libc)  # bound_native_memory's first step off the env
    lowrank_cli.evaluate(folder, candidate, text=line_text(tmp_path / "eval.txt"))
    assert CACHE_VARIABLE not in os.environ


@pytest.mark.parametrize("users", [None, "64"])
def test_the_cli_bounds_native_memory_for_evaluate_keeping_the_users_own_setting(tmp_path, monkeypatch, users):
    folder = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(folder, tmp_path)
    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    if users is not None:
        monkeypatch.setenv(CACHE_VARIABLE, users)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own threshold: glibc is left as it is
    monkeypatch.setattr("ctypes.util.find_library", _no_libc)
    result = cli("evaluate", folder, candidate, "--text", line_text(tmp_path / "eval.txt"))
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert os.environ[CACHE_VARIABLE] == (users or "8")


def test_bound_native_memory_sets_glibc_threshold_only_on_glibc(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    from lowrank_cli.ops import memory

    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: Libc())
    lowrank_cli.bound_native_memory()
    assert calls == [(-3, 128 * 1024)] and os.environ[CACHE_VARIABLE] == "8"
    calls.clear()
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: None)  # no C library found: nothing done
    lowrank_cli.bound_native_memory()
    assert calls == []
