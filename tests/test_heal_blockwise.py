"""lowrank heal --blockwise: each compressed block trained toward the reference's block, one at a time.

Every figure is recomputed here on an independent path: the reference loaded by transformers, the
compressed and healed models as transformers loads them after `lowrank expand`, each block's output
caught by a forward hook on the whole model's decoder layer, one line of text at a time (no batching,
no padding), where heal ran the block runner on padded batches.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import cli, file_metadata, load, raw_tensors
from test_evaluate import compressed, dense_model, encoded, line_text, tiny_folder
from test_heal import WEIGHTS, kl_per_token

import lowrank_cli
from lowrank_cli.errors import UsageError

transformers = pytest.importorskip("transformers")

EPS32 = float(np.finfo(np.float32).eps)
BLOCKS = "model.layers."


@torch.no_grad()
def block_errors(reference, model, lines: list[list[int]], *, reference_inputs: bool) -> list[float]:
    """Per decoder layer i: Σ‖y′ − y‖² / Σ‖y‖² over every token of `lines`, y the reference layer's output on
    its own input and y′ the model's layer i on the model's own stream (reference_inputs=False) or on the
    very input the reference's layer i was called with (True)."""
    layers = len(reference.model.layers)
    residual, norm = [0.0] * layers, [0.0] * layers
    for ids in lines:
        calls, outputs = {}, {}
        hooks = []
        for i, layer in enumerate(reference.model.layers):

            def catch(module, args, kwargs, output, i=i, calls=calls, outputs=outputs):
                calls[i], outputs[i] = (args, kwargs), (output[0] if isinstance(output, tuple) else output)

            hooks.append(layer.register_forward_hook(catch, with_kwargs=True))
        reference(input_ids=torch.tensor([ids]), use_cache=False)  # a cache in the calls would be shared below
        for hook in hooks:
            hook.remove()
        if reference_inputs:
            theirs = {}
            for i, layer in enumerate(model.model.layers):
                args, kwargs = calls[i]
                output = layer(*args, **kwargs)
                theirs[i] = output[0] if isinstance(output, tuple) else output
        else:
            theirs = {}
            hooks = [
                layer.register_forward_hook(
                    lambda m, a, o, i=i, theirs=theirs: theirs.__setitem__(i, o[0] if isinstance(o, tuple) else o)
                )
                for i, layer in enumerate(model.model.layers)
            ]
            model(input_ids=torch.tensor([ids]), use_cache=False)
            for hook in hooks:
                hook.remove()
        for i in range(layers):
            y, y2 = outputs[i].double(), theirs[i].double()
            residual[i] += float((y2 - y).square().sum())
            norm[i] += float(y.square().sum())
    return [r / n for r, n in zip(residual, norm, strict=True)]


def test_blockwise_heal_lowers_every_blocks_error_and_the_held_out_kl(tmp_path):
    folder = tiny_folder(tmp_path, "causal-lm", tied=True)  # the LM head is the embedding: factors outside the blocks
    candidate = compressed(folder, tmp_path, rank=3)
    train, held = line_text(tmp_path / "train.txt", lines=200, seed=3), line_text(tmp_path / "eval.txt", seed=5)
    out = tmp_path / "healed"
    result = cli(
        "heal", folder, candidate, "--text", train, "-o", out, "--blockwise", "--lr", "3e-3", "--epochs", "4",
        "--eval-text", held, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    record = report["options"]["heal"]
    assert record["mode"] == "blockwise" and record["block_inputs"] == "compressed"
    assert json.loads(file_metadata(out / WEIGHTS)["lowrank"])["heal"]["mode"] == "blockwise"

    reference, before_model = dense_model(folder, candidate, tmp_path)[::-1]
    after_model = dense_model(folder, out, tmp_path)[0]
    lines = encoded(folder, train)
    before = block_errors(reference, before_model, lines, reference_inputs=False)
    after = block_errors(reference, after_model, lines, reference_inputs=False)
    assert all(a < 0.95 * b for a, b in zip(after, before, strict=True)), (before, after)
    # what heal recorded is what it trained on: the same samples, each block on the healed blocks before it
    recorded = np.array(record["block_errors"])
    np.testing.assert_allclose(recorded[:, 1], after, rtol=1e-4)
    for i in range(len(before)):  # block i before healing, on the healed blocks before it
        hybrid = copy.deepcopy(after_model)
        hybrid.model.layers[i] = before_model.model.layers[i]
        assert recorded[i, 0] == pytest.approx(
            block_errors(reference, hybrid, lines, reference_inputs=False)[i], rel=1e-4
        )
    held_before = block_errors(reference, before_model, encoded(folder, held), reference_inputs=False)
    held_after = block_errors(reference, after_model, encoded(folder, held), reference_inputs=False)
    assert all(a < b for a, b in zip(held_after, held_before, strict=True)), (held_before, held_after)
    held_lines = encoded(folder, held)
    assert kl_per_token(reference, after_model, held_lines) < 0.9 * kl_per_token(reference, before_model, held_lines)

    # evaluate reads OUT, and its fidelity is the one heal reported (block by block, as evaluate measures)
    evaluated = lowrank_cli.evaluate(folder, out, text=held, batch_size=16)
    assert record["fidelity_after"] == pytest.approx(evaluated.fidelity, rel=0, abs=1e-6)
    assert record["fidelity_after"] > record["fidelity_before"] and record["held_out"] is True

    # only the blocks' factors moved; the tied embedding's factors and every other tensor are byte for byte
    old, new = raw_tensors(candidate / WEIGHTS), raw_tensors(out / WEIGHTS)
    assert {n: v[:2] for n, v in old.items()} == {n: v[:2] for n, v in new.items()}
    changed = {n for n in old if old[n][2] != new[n][2]}
    assert changed and all(n.startswith(BLOCKS) and n.endswith((".A", ".B", ".bias")) for n in changed)
    assert new["model.embed_tokens.weight.B"] == old["model.embed_tokens.weight.B"]
    assert new["model.embed_tokens.weight.A"] == old["model.embed_tokens.weight.A"]
    # each healed factor's rel_error measured anew on what is written; the embedding's record as it was
    records = json.loads(file_metadata(out / WEIGHTS)["lowrank"])["tensors"]
    old_records = json.loads(file_metadata(candidate / WEIGHTS)["lowrank"])["tensors"]
    weights, written = load(folder / "model.safetensors"), load(out / WEIGHTS)
    for name, fields in records.items():
        if not name.startswith(BLOCKS):
            assert fields == old_records[name]
            continue
        w = weights[name].double()
        error = float(torch.linalg.norm(w - written[f"{name}.B"].double() @ written[f"{name}.A"].double()) / w.norm())
        assert fields["rel_error"] == pytest.approx(error, rel=1e-6)
    assert {row["name"] for row in report["tensors"]} == {n for n in records if n.startswith(BLOCKS)}


def test_blockwise_heal_on_the_references_inputs(tmp_path):
    """block_inputs="reference": block i trains on the reference's own input to block i, and its error there falls."""
    from lowrank_cli.model.heal import HealOptions, heal

    folder = tiny_folder(tmp_path, "causal-lm")
    candidate = compressed(folder, tmp_path, rank=3)
    train = line_text(tmp_path / "train.txt", lines=200, seed=3)
    out = tmp_path / "healed"
    options = HealOptions(lr=3e-3, epochs=4, blockwise=True, block_inputs="reference")
    record = heal(folder, candidate, train, out, options=options).options["heal"]
    assert record["block_inputs"] == "reference"
    reference, before_model = dense_model(folder, candidate, tmp_path)[::-1]
    after_model = dense_model(folder, out, tmp_path)[0]
    lines = encoded(folder, train)
    before = block_errors(reference, before_model, lines, reference_inputs=True)
    after = block_errors(reference, after_model, lines, reference_inputs=True)
    assert all(a < 0.99 * b for a, b in zip(after, before, strict=True)), (before, after)
    recorded = np.array(record["block_errors"])
    np.testing.assert_allclose(recorded[:, 0], before, rtol=1e-4)
    np.testing.assert_allclose(recorded[:, 1], after, rtol=1e-4)
    with pytest.raises(UsageError, match="block_inputs"):
        HealOptions(block_inputs="both")
