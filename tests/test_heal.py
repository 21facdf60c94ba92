"""lowrank heal: a compressed tiny model trained back toward its reference (models built from configs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, cli, file_metadata, load, raw_tensors, sha256
from test_evaluate import compressed, dense_model, encoded, independent_cosine, line_text, tiny_folder

import lowrank_cli
from lowrank_cli.errors import UsageError

transformers = pytest.importorskip("transformers")

WEIGHTS = "model.lowrank.safetensors"  # a compressed folder's weights, a name from_pretrained does not load


def heal_args(folder: Path, candidate: Path, text: Path, out: Path, *extra: str) -> list:
    return ["heal", folder, candidate, "--text", text, "-o", out, "--lr", "3e-3", "--epochs", "4", *extra]


def test_heal_raises_the_fidelity_and_keeps_the_format(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    candidate = compressed(folder, tmp_path, rank=3)
    train, held = line_text(tmp_path / "train.txt", lines=200, seed=3), line_text(tmp_path / "eval.txt", seed=4)
    out = tmp_path / "healed"
    result = cli(*heal_args(folder, candidate, train, out, "--eval-text", str(held), "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    before = independent_cosine(folder, candidate, held, tmp_path)
    after = independent_cosine(folder, out, held, tmp_path)
    assert after > before + 0.01, (before, after)
    healed = report["options"]["heal"]
    assert healed["fidelity_before"] == pytest.approx(before, abs=1e-5)
    assert healed["fidelity_after"] == pytest.approx(after, abs=1e-5) and healed["held_out"] is True
    assert healed["text_sha256"] == sha256(train) and healed["steps"] == 4 * math.ceil(healed["samples"] / 16)
    # the same names, shapes, dtypes and ranks as COMPRESSED; the params are exactly the same
    old, new = raw_tensors(candidate / WEIGHTS), raw_tensors(out / WEIGHTS)
    assert {n: v[:2] for n, v in old.items()} == {n: v[:2] for n, v in new.items()}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in candidate.iterdir())
    records = json.loads(file_metadata(out / WEIGHTS)["lowrank"])["tensors"]
    reference = load(folder / "model.safetensors")
    written = load(out / WEIGHTS)
    rows = {t["name"]: t for t in report["tensors"]}
    assert set(rows) == set(records) and rows
    for name, record in records.items():
        w = reference[name].double().numpy()
        product = written[f"{name}.B"].double().numpy() @ written[f"{name}.A"].double().numpy()
        error = np.linalg.norm(w - product) / np.linalg.norm(w)
        assert record["rel_error"] == pytest.approx(error, rel=1e-6) == rows[name]["rel_error"]
        assert record["rank"] == json.loads(file_metadata(candidate / WEIGHTS)["lowrank"])["tensors"][name]["rank"]
    changed = [n for n in old if old[n][2] != new[n][2]]
    assert changed and all(n.endswith((".A", ".B", ".bias")) for n in changed)  # nothing else moved


@torch.no_grad()
def test_heal_lowers_a_causal_lms_kl(tmp_path):
    folder = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(folder, tmp_path, rank=3)
    train = line_text(tmp_path / "train.txt", lines=200, seed=3)
    out = tmp_path / "healed"
    assert cli(*heal_args(folder, candidate, train, out)).exit_code == 0

    held = line_text(tmp_path / "eval.txt", seed=5)
    assert _kl(folder, out, held, tmp_path) < 0.8 * _kl(folder, candidate, held, tmp_path)


def test_the_same_seed_heals_the_same_way(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    candidate = compressed(folder, tmp_path, rank=3)
    train = line_text(tmp_path / "train.txt", lines=40, seed=3)
    outs = []
    for run in range(2):
        out = tmp_path / f"healed{run}"
        lowrank_cli.heal(folder, candidate, out, text=train, steps=5, lr=1e-3, seed=7)
        outs.append(load(out / WEIGHTS))
    for name in outs[0]:
        torch.testing.assert_close(outs[0][name], outs[1][name], rtol=1e-5, atol=1e-7)


def test_every_text_the_model_was_made_with_is_not_held_out(tmp_path):
    """heal's training text (of this heal and an earlier one) and COMPRESSED's calibration text: evaluate
    and heal --eval-text say held_out false on each, and true on a text none of them used."""
    folder = tiny_folder(tmp_path, "encoder")
    texts = {name: line_text(tmp_path / f"{name}.txt", lines=40, seed=seed) for seed, name in enumerate("CTUO")}
    stats = tmp_path / "stats.safetensors"
    lowrank_cli.calibrate(folder, stats, text=texts["C"], sensitivity=False)
    candidate = tmp_path / "c"
    lowrank_cli.compress(folder, candidate, rank=3, calibration=stats)
    once, twice = tmp_path / "h1", tmp_path / "h2"
    report = lowrank_cli.heal(folder, candidate, once, text=texts["T"], steps=2, eval_text=texts["C"])
    assert report.options["heal"]["held_out"] is False
    assert any("calibration text" in note for note in report.options["notes"])
    lowrank_cli.heal(folder, once, twice, text=texts["U"], steps=2)
    record = json.loads(file_metadata(twice / WEIGHTS)["lowrank"])
    assert record["heal"]["text_sha256"] == sha256(texts["U"])
    assert record["heal"]["earlier_text_sha256"] == [sha256(texts["T"])]
    for name, held in {"C": False, "T": False, "U": False, "O": True}.items():
        result = lowrank_cli.evaluate(folder, twice, text=texts[name])
        assert result.held_out is held, name
        assert any("not held out" in note for note in result.notes) is not held
    assert lowrank_cli.evaluate(folder, once, text=texts["T"]).held_out is False
    assert lowrank_cli.evaluate(folder, once, text=texts["U"]).held_out is True


def test_a_loss_that_becomes_nan_writes_nothing(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    candidate = compressed(folder, tmp_path, rank=3)
    train = line_text(tmp_path / "train.txt", lines=40)
    out = tmp_path / "healed"
    result = cli("heal", folder, candidate, "--text", train, "-o", out, "--lr", "1e30", "--steps", "20")
    assert_clean_failure(result, 1, "loss", "--lr")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("broken", ["compressed", "reference"])
def test_a_nan_model_is_named_not_the_learning_rate(tmp_path, broken):
    """A loss that is NaN before any update comes from a model's outputs, which no --lr fixes."""
    from safetensors.torch import save_file

    folder = tiny_folder(tmp_path, "encoder")
    candidate = compressed(folder, tmp_path, rank=3)
    target = (candidate / WEIGHTS) if broken == "compressed" else (folder / "model.safetensors")
    tensors = load(target)
    name = next(n for n in tensors if n.endswith(("output.dense.weight.B", "output.dense.weight")))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(target), metadata=file_metadata(target))
    train = line_text(tmp_path / "train.txt", lines=40)
    out = tmp_path / "healed"
    result = cli("heal", folder, candidate, "--text", train, "-o", out, "--steps", "3")
    words = "the compressed model's outputs" if broken == "compressed" else "the reference's outputs"
    assert_clean_failure(result, 1, "at step 1", words, "NaN")
    assert "--lr" not in result.stderr
    assert not out.exists()


def test_a_compressed_model_of_another_reference_is_refused(tmp_path):
    encoder = tiny_folder(tmp_path, "encoder")
    causal = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(causal, tmp_path, rank=3)
    train = line_text(tmp_path / "train.txt", lines=40)
    result = cli("heal", encoder, candidate, "--text", train, "-o", tmp_path / "healed")
    assert_clean_failure(result, 1, "was not compressed from")
    assert not (tmp_path / "healed").exists()


def test_a_dense_folder_is_not_healed(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    train = line_text(tmp_path / "train.txt", lines=40)
    result = cli("heal", folder, folder, "--text", train, "-o", tmp_path / "healed")
    assert_clean_failure(result, 1, "not a lowrank file")


def _reference_and_runs(tmp_path):
    from lowrank_cli.ops.samples import batches

    folder = tiny_folder(tmp_path, "encoder")
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    runs = batches([ids for ids in encoded(folder, line_text(tmp_path / "t.txt", lines=12, seed=2))], 4, "cpu", 0)
    calls = []
    reference.register_forward_hook(lambda module, args, output: calls.append(1))
    return reference, runs, calls


def test_an_encoders_targets_are_kept_after_the_first_pass(tmp_path):
    from lowrank_cli.model.heal import _Targets

    reference, runs, calls = _reference_and_runs(tmp_path)
    targets = _Targets(reference, runs, "encoder")
    for _ in range(3):  # three passes, one forward of the reference per batch
        got = [targets(index) for index in range(len(runs))]
    assert len(calls) == len(runs)
    for (ids, mask), layers in zip(runs, got, strict=True):
        with torch.no_grad():
            hidden = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(layers) == len(hidden) == reference.config.num_hidden_layers + 1
        for h, kept in zip(hidden, layers, strict=True):
            real = h[mask.bool()]  # (real tokens, d): padding is never a target
            assert kept.dtype == torch.float32 and kept.shape == real.shape
            torch.testing.assert_close(kept, real, rtol=2**-8, atol=1e-6)  # bfloat16 rounding, no more


def test_targets_over_the_memory_cap_are_recomputed(tmp_path, monkeypatch):
    from lowrank_cli.model import heal
    from lowrank_cli.model.heal import _Targets

    reference, runs, calls = _reference_and_runs(tmp_path)
    monkeypatch.setattr(heal, "TARGET_CACHE_BYTES", 0)
    targets = _Targets(reference, runs, "encoder")
    first = [targets(index) for index in range(len(runs))]
    again = [targets(index) for index in range(len(runs))]
    assert len(calls) == 2 * len(runs) and not targets.kept
    for a, b in zip(first, again, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)  # the same float32 values, not rounded


def test_targets_are_kept_batch_by_batch_until_the_cap_is_full(tmp_path, monkeypatch):
    from lowrank_cli.model import heal
    from lowrank_cli.model.heal import _Targets

    reference, runs, calls = _reference_and_runs(tmp_path)
    width = reference.config.hidden_size * (reference.config.num_hidden_layers + 1)
    sizes = [2 * width * int(mask.sum()) for _, mask in runs]  # each batch's targets in bfloat16
    monkeypatch.setattr(heal, "TARGET_CACHE_BYTES", sizes[0] + sizes[1])  # room for the first two only
    targets = _Targets(reference, runs, "encoder")
    passes = [[targets(index) for index in range(len(runs))] for _ in range(3)]
    assert sorted(targets.kept) == [0, 1]
    assert len(calls) == len(runs) + 2 * (len(runs) - 2)  # the rest rerun on every later pass
    for later in passes[1:]:  # every pass sees the same targets: rounded where kept, exact elsewhere
        for a, b in zip(passes[0], later, strict=True):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_the_reference_keeps_its_dtype_and_no_gradient_outlives_its_step(tmp_path, monkeypatch):
    # Memory (docs/heal.md): a bfloat16 reference upcast to float32 would take twice its size, and a
    # step's gradients kept until after the next forward would sit beside that step's activations.
    from lowrank_cli.model import heal as heal_module

    folder = tiny_folder(tmp_path, "causal-lm", dtype=torch.bfloat16)
    candidate = compressed(folder, tmp_path, rank=3)
    train = line_text(tmp_path / "train.txt", lines=40, seed=3)
    seen: dict = {"gradients at a forward": []}
    real_train = heal_module.train

    def spy(reference, model, *args, **kwargs):
        seen["reference"] = {p.dtype for p in reference.parameters()}
        seen["trained"] = {p.dtype for p in model.parameters() if p.requires_grad}

        def count(module, inputs):
            seen["gradients at a forward"].append(sum(p.grad is not None for p in model.parameters()))

        model.register_forward_pre_hook(count)
        result = real_train(reference, model, *args, **kwargs)
        seen["gradients after"] = sum(p.grad is not None for p in model.parameters())
        return result

    monkeypatch.setattr(heal_module, "train", spy)
    lowrank_cli.heal(folder, candidate, tmp_path / "healed", text=train, steps=3, lr=1e-3, batch_size=4)
    assert seen["reference"] == {torch.bfloat16}  # run as evaluate runs it, not upcast
    assert seen["trained"] == {torch.float32}  # the factors train in float32 all the same
    assert seen["gradients at a forward"] == [0, 0, 0]
    assert seen["gradients after"] == 0
    written = raw_tensors(tmp_path / "healed" / WEIGHTS)
    assert {v[0] for n, v in written.items() if n.endswith((".A", ".B"))} == {"BF16"}  # written back as stored


@pytest.mark.parametrize("kind", ["causal-lm", "masked-lm"])
def test_a_language_models_loss_is_the_mean_kl_per_position(kind):
    # written as Σ P·log P − Σ P·log Q to keep fewer vocabulary-wide tensors; the KL all the same
    from types import SimpleNamespace

    from lowrank_cli.model.heal import _lm_target, _loss

    generator = torch.Generator().manual_seed(0)
    reference, candidate = torch.randn(3, 9, 50, generator=generator), torch.randn(3, 9, 50, generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding
    logits = candidate.clone().requires_grad_(True)
    loss = _loss(kind, _lm_target(kind, SimpleNamespace(logits=reference), mask), SimpleNamespace(logits=logits), mask)
    loss.backward()

    p, q = reference.double().numpy(), candidate.double().numpy()
    p, q = p - np.log(np.exp(p).sum(-1, keepdims=True)), q - np.log(np.exp(q).sum(-1, keepdims=True))
    kl, count, gradient = 0.0, 0, np.zeros_like(q)
    for row in range(3):
        for t in range(9):
            compared = mask[row, t] and (kind == "masked-lm" or (t + 1 < 9 and mask[row, t + 1]))
            if compared:
                kl += float((np.exp(p[row, t]) * (p[row, t] - q[row, t])).sum())
                count += 1
                gradient[row, t] = np.exp(q[row, t]) - np.exp(p[row, t])  # d KL / d logits: Q − P
    assert count == (8 + 5 + 8 if kind == "causal-lm" else 9 + 6 + 9)
    assert float(loss.detach()) == pytest.approx(kl / count, rel=1e-6)
    np.testing.assert_allclose(logits.grad.numpy(), gradient / count, atol=1e-7)


@torch.no_grad()
def kl_per_token(reference: torch.nn.Module, model: torch.nn.Module, lines: list[list[int]]) -> float:
    """Mean KL(reference ‖ model) per next token, one line at a time."""
    total = count = 0.0
    for ids in lines:
        x = torch.tensor([ids])
        p = torch.log_softmax(reference(input_ids=x).logits[0, :-1].double(), -1)
        q = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += len(ids) - 1
    return total / count


def _kl(folder: Path, model_folder: Path, text: Path, tmp_path: Path) -> float:
    """kl_per_token of the model loaded as transformers loads it after `lowrank expand` (an independent path
    to its weights), over the lines of `text`."""
    tuned, reference = dense_model(folder, model_folder, tmp_path)
    return kl_per_token(reference, tuned, encoded(folder, text))


def test_a_tied_embedding_heals_as_one_factor_pair(tmp_path):
    # SmolLM2, GPT-2, BERT-MLM, Llama-3.2 tie the LM head to the embedding: one tensor, one factor pair
    from lowrank_cli.nn.loading import load_pretrained

    folder = tiny_folder(tmp_path, "causal-lm", tied=True)
    assert "lm_head.weight" not in raw_tensors(folder / "model.safetensors")  # saved once, as the embedding
    candidate = compressed(folder, tmp_path, rank=3)
    embedding = "model.embed_tokens.weight"
    assert {f"{embedding}.B", f"{embedding}.A"} <= set(raw_tensors(candidate / WEIGHTS))
    train = line_text(tmp_path / "train.txt", lines=200, seed=3)
    out = tmp_path / "healed"
    result = cli(*heal_args(folder, candidate, train, out))
    assert result.exit_code == 0, result.output
    written = raw_tensors(out / WEIGHTS)
    assert set(written) == set(raw_tensors(candidate / WEIGHTS))
    assert not [name for name in written if name.startswith("lm_head")]
    assert written[f"{embedding}.B"][2] != raw_tensors(candidate / WEIGHTS)[f"{embedding}.B"][2]  # it trained
    model = load_pretrained(out)
    head, table = model.lm_head, model.model.embed_tokens
    assert head.B is table.B and head.A is table.A  # still tied: one B, one A
    torch.testing.assert_close(table.B.detach(), load(out / WEIGHTS)[f"{embedding}.B"], rtol=0, atol=0)
    held = line_text(tmp_path / "eval.txt", seed=5)
    assert _kl(folder, out, held, tmp_path) < 0.8 * _kl(folder, candidate, held, tmp_path)


def test_tied_factors_train_as_one_float32_parameter(tmp_path):
    from lowrank_cli.model.heal import trainable
    from lowrank_cli.nn.loading import load_pretrained

    folder = tiny_folder(tmp_path, "causal-lm", dtype=torch.bfloat16, tied=True)
    candidate = compressed(folder, tmp_path, rank=3)
    model = load_pretrained(candidate)
    layers = trainable(model, set(raw_tensors(candidate / WEIGHTS)))
    names = [layer.name for layer in layers]
    assert len(names) == len(set(names)) == 15  # 7 Linears in each of 2 layers, and the embedding once
    (tied,) = [layer for layer in layers if layer.name == "model.embed_tokens.weight"]
    assert len(tied.layers) == 2
    assert model.lm_head.B is model.model.embed_tokens.B is tied.parameters()[0]  # float32 and still shared
    assert {p.dtype for layer in layers for p in layer.parameters()} == {torch.float32}


def test_heal_leaves_the_global_random_state_as_it_was(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    candidate = compressed(folder, tmp_path, rank=3)
    train = line_text(tmp_path / "train.txt", lines=40, seed=3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    lowrank_cli.heal(folder, candidate, tmp_path / "healed", text=train, steps=4, lr=1e-3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)


def test_gradients_are_clipped_before_each_step(tmp_path, monkeypatch):
    from lowrank_cli.model.heal import HealOptions, heal

    folder = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(folder, tmp_path, rank=3)
    train = line_text(tmp_path / "train.txt", lines=40, seed=3)
    norms = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # the norm of the gradients the optimizer is given
        grads = [p.grad.double().flatten() for group in self.param_groups for p in group["params"]]
        norms.append(float(torch.cat(grads).norm()))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    heal(folder, candidate, train, tmp_path / "clipped", options=HealOptions(steps=4, lr=1e-3, max_grad_norm=0.05))
    assert len(norms) == 4 and max(norms) == pytest.approx(0.05, rel=1e-4)  # all clipped: raw ones are larger
    norms.clear()
    heal(folder, candidate, train, tmp_path / "free", options=HealOptions(steps=4, lr=1e-3, max_grad_norm=1e9))
    assert min(norms) > 0.05  # so the first run's were cut down to 0.05
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="max_grad_norm must be a positive number"):
            HealOptions(max_grad_norm=bad)


def test_fidelity_before_and_after_is_what_evaluate_measures(tmp_path):
    # a bfloat16 model: measured in float32 the figures would not be those evaluate gives for the same files
    folder = tiny_folder(tmp_path, "causal-lm", dtype=torch.bfloat16)
    candidate = compressed(folder, tmp_path, rank=3)
    train, held = line_text(tmp_path / "train.txt", lines=100, seed=3), line_text(tmp_path / "eval.txt", seed=4)
    out = tmp_path / "healed"
    report = lowrank_cli.heal(folder, candidate, out, text=train, eval_text=held, steps=6, lr=3e-3, batch_size=8)
    healed = report.options["heal"]
    before = lowrank_cli.evaluate(folder, candidate, text=held, batch_size=8)
    after = lowrank_cli.evaluate(folder, out, text=held, batch_size=8)
    assert healed["fidelity_before"] == pytest.approx(before.fidelity, rel=0, abs=1e-9)
    assert healed["fidelity_after"] == pytest.approx(after.fidelity, rel=0, abs=1e-9)
