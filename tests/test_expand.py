"""`lowrank expand`: every original tensor back under its name, shape, dtype, with the metadata."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    by_name,
    cli,
    cli_json,
    file_metadata,
    load,
    low_rank,
    raw_tensors,
    save,
    sha256,
)
from safetensors.torch import load_file


def _checkpoint() -> dict[str, torch.Tensor]:
    return {
        "blocks.0.attn.weight": low_rank(24, 16, 3, seed=1),
        "blocks.0.attn.bias": torch.randn(24),
        "blocks.1.mlp.weight": low_rank(32, 12, 4, seed=2, dtype=torch.bfloat16),
        "blocks.1.mlp.half": low_rank(20, 20, 2, seed=3, dtype=torch.float16),
        "blocks.2.proj.weight": low_rank(16, 24, 5, seed=4, dtype=torch.float64),
        "conv.weight": low_rank(8, 4 * 3 * 3, 2, seed=5).reshape(8, 4, 3, 3),
        "position_ids": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([[True, False], [False, True]]),
        "empty": torch.zeros(0, 5),
    }


def _roundtrip(tmp_path, tensors, metadata, *policy):
    source = save(tmp_path / "model.safetensors", tensors, metadata)
    compressed, dense = tmp_path / "c.safetensors", tmp_path / "d.safetensors"
    report = by_name(cli_json("compress", source, *policy, "-o", compressed))
    result = cli("expand", compressed, "-o", dense)
    assert result.exit_code == 0, result.stderr
    return source, compressed, dense, report


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"format": "pt", "note": "ünïcödé ✓", "step": "1200"}])
def test_roundtrip_keeps_names_shapes_dtypes_metadata(tmp_path, metadata):
    tensors = _checkpoint()
    source, compressed, dense, report = _roundtrip(tmp_path, tensors, metadata, "--rank", "5")

    factorized = {name for name, t in report.items() if t["status"] == "factorized"}
    assert factorized == {
        "blocks.0.attn.weight",
        "blocks.1.mlp.weight",
        "blocks.1.mlp.half",
        "blocks.2.proj.weight",
        "conv.weight",
    }
    assert file_metadata(dense) == metadata
    assert file_metadata(compressed) is not None and "lowrank" in file_metadata(compressed)

    expanded = load_file(str(dense))  # the official loader reads it
    assert set(expanded) == set(tensors)
    raw_in, raw_out = raw_tensors(source), raw_tensors(dense)
    for name, tensor in tensors.items():
        assert expanded[name].dtype == tensor.dtype, name
        assert expanded[name].shape == tensor.shape, name
        assert raw_out[name][:2] == raw_in[name][:2], name  # dtype code, shape
        if name not in factorized:
            assert raw_out[name] == raw_in[name], name
        else:  # rank ≤ 5 matrices at rank 5: rebuilt up to the dtype's rounding
            w, w2 = tensor.to(torch.float64), expanded[name].to(torch.float64)
            tolerance = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}[
                tensor.dtype
            ]
            assert float(torch.linalg.vector_norm(w - w2) / torch.linalg.vector_norm(w)) < tolerance, name


def test_empty_metadata_is_kept(tmp_path):
    """A header with an empty __metadata__ comes back as an empty __metadata__, not as none."""
    _, _, dense, _ = _roundtrip(tmp_path, {"W": low_rank(12, 10, 2)}, {}, "--rank", "2")
    assert file_metadata(tmp_path / "model.safetensors") == {}
    assert file_metadata(dense) == {}


def test_expanded_tensor_is_the_product_of_the_factors(tmp_path):
    tensors = {"W": low_rank(30, 20, 20, seed=6), "V": low_rank(30, 20, 20, seed=7, dtype=torch.bfloat16)}
    _, compressed, dense, _ = _roundtrip(tmp_path, tensors, None, "--rank", "3")
    factors, expanded = load(compressed), load(dense)
    for name, tensor in tensors.items():
        b, a = factors[f"{name}.B"].to(torch.float64), factors[f"{name}.A"].to(torch.float64)
        product = b @ a  # (30, 3) @ (3, 20) -> (30, 20)
        got = expanded[name]
        assert got.dtype == tensor.dtype
        # the product rounded once to the tensor's dtype
        eps = torch.finfo(tensor.dtype).eps
        assert torch.allclose(got.to(torch.float64), product, rtol=eps, atol=eps * float(product.abs().max()))


def test_expand_report_lists_every_original_tensor(tmp_path):
    tensors = _checkpoint()
    _, compressed, _, report = _roundtrip(tmp_path, tensors, {"format": "pt"}, "--rank", "5")
    expanded = by_name(cli_json("expand", compressed, "-o", tmp_path / "again.safetensors"))
    assert set(expanded) == set(tensors)
    for name, tensor in tensors.items():
        t = expanded[name]
        assert t["shape"] == list(tensor.shape) and t["params"] == tensor.numel(), name
        if report[name]["status"] == "factorized":
            assert t["status"] == "expanded" and t["rank"] == report[name]["rank"], name
        else:
            assert t["status"] == "copied", name


def test_default_output_is_beside_the_input(tmp_path):
    source = save(tmp_path / "net.safetensors", {"W": low_rank(12, 10, 2), "b": torch.randn(12)}, {"format": "pt"})
    assert cli("compress", source, "--rank", 2).exit_code == 0
    compressed = tmp_path / "net.lowrank.safetensors"
    before = sha256(compressed)
    result = cli("expand", compressed)
    assert result.exit_code == 0, result.stderr
    dense = tmp_path / "net.dense.safetensors"  # .lowrank taken away, never the original's name
    assert dense.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, compressed.name, dense.name])
    assert set(load_file(str(dense))) == {"W", "b"}
    assert file_metadata(dense) == {"format": "pt"}
    assert sha256(compressed) == before


def test_sharded_checkpoint_roundtrip(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {
            "layers.0.weight": low_rank(12, 10, 2, seed=8),
            "layers.0.bias": torch.randn(12),
        },
        "model-00002-of-00002.safetensors": {"layers.1.weight": low_rank(14, 9, 3, seed=9), "ids": torch.arange(4)},
    }
    for shard, tensors in shards.items():
        save(folder / shard, tensors, {"format": "pt"})
    weight_map = {name: shard for shard, tensors in shards.items() for name in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"hidden": 12}')
    hashes = {p.name: sha256(p) for p in folder.iterdir()}

    compressed, dense = tmp_path / "ckpt.lowrank", tmp_path / "ckpt.dense"
    report = by_name(cli_json("compress", folder, "--rank", 3, "-o", compressed))
    assert report["layers.0.weight"]["status"] == report["layers.1.weight"]["status"] == "factorized"
    assert cli("expand", compressed, "-o", dense).exit_code == 0

    assert {p.name: sha256(p) for p in folder.iterdir()} == hashes
    assert (dense / "config.json").read_text() == '{"hidden": 12}'
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    for shard, tensors in shards.items():
        raw_in, raw_out = raw_tensors(folder / shard), raw_tensors(dense / shard)
        assert set(raw_out) == set(tensors)
        assert file_metadata(dense / shard) == {"format": "pt"}
        for name, tensor in tensors.items():
            assert raw_out[name][:2] == raw_in[name][:2], name
            if name.endswith("weight"):
                w2 = load(dense / shard)[name]
                assert float(torch.linalg.vector_norm(w2 - tensor) / torch.linalg.vector_norm(tensor)) < 1e-5
            else:
                assert raw_out[name] == raw_in[name], name
