"""Sharded checkpoints in the Hugging Face layout: a folder of shards, an index, and companion files.

Expected values come from the shards themselves (their headers and tensors), never from lowrank's report.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import (
    assert_clean_failure,
    by_name,
    cli,
    cli_json,
    file_metadata,
    geometric,
    listing,
    load,
    low_rank,
    raw_tensors,
    relative_error,
    save,
    sha256,
    singular_values,
    temp_files,
    with_spectrum,
)

INDEX = "model.safetensors.index.json"
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
# What compress names them in its output folder: transformers looks for none of these names
LOWRANK_1, LOWRANK_2 = (shard.replace(".safetensors", ".lowrank.safetensors") for shard in (SHARD_1, SHARD_2))
LOWRANK_INDEX = "model.lowrank.safetensors.index.json"
CONFIG = '{"architectures": ["Tiny"], "hidden_size": 40}\n'
METADATA = {SHARD_1: {"format": "pt", "shard": "first"}, SHARD_2: None}  # each shard its own metadata, or none


def _shards() -> dict[str, dict[str, torch.Tensor]]:
    return {
        SHARD_1: {
            "model.layers.0.weight": with_spectrum(40, 24, geometric(24, 0.6), seed=1),
            "model.layers.0.bias": torch.randn(40),
            "model.embed.weight": low_rank(30, 20, 3, seed=2).to(torch.bfloat16),
        },
        SHARD_2: {
            "model.layers.1.weight": low_rank(32, 32, 4, seed=3),
            "model.layers.1.bias": torch.randn(32),
            "model.position_ids": torch.arange(16, dtype=torch.int64),
            "model.conv.weight": low_rank(8, 4 * 3 * 3, 2, seed=4).reshape(8, 4, 3, 3),
        },
    }


def write_checkpoint(folder, shards, *, index=True, metadata=METADATA):
    """Shards, config.json and tokenizer.json in `folder`, and the index unless index=False."""
    folder.mkdir()
    for shard, tensors in shards.items():
        save(folder / shard, tensors, metadata.get(shard))
    (folder / "config.json").write_text(CONFIG)
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    weight_map = {name: shard for shard, tensors in shards.items() for name in tensors}
    if index:
        total = sum(tensor_bytes(folder / shard) for shard in shards)
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder, weight_map


def header(path) -> dict:
    """A safetensors file's header: tensor -> {dtype, shape, data_offsets}, without __metadata__."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        parsed = json.loads(handle.read(size))
    parsed.pop("__metadata__", None)
    return parsed


def tensor_bytes(path) -> int:
    """Σ end − start over the tensors of one file, read from its header."""
    return sum(end - start for start, end in (info["data_offsets"] for info in header(path).values()))


def names_by_shard(folder) -> dict[str, str]:
    """tensor -> the shard file in `folder` that really holds it."""
    return {name: p.name for p in sorted(folder.glob("*.safetensors")) for name in header(p)}


@pytest.fixture
def checkpoint(tmp_path):
    shards = _shards()
    folder, weight_map = write_checkpoint(tmp_path / "ckpt", shards)
    return folder, shards, weight_map


def _hashes(folder) -> dict[str, str]:
    return {p.name: sha256(p) for p in folder.iterdir() if p.is_file()}


# --- analyze ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "index", "folder without index"])
def test_analyze_reports_every_tensor_once(checkpoint, form):
    folder, shards, weight_map = checkpoint
    if form == "folder without index":
        (folder / INDEX).unlink()
    path = folder / INDEX if form == "index" else folder
    report = cli_json("analyze", path)
    names = [t["name"] for t in report["tensors"]]
    assert sorted(names) == sorted(weight_map)
    assert len(names) == len(set(names))
    for t in report["tensors"]:
        assert t["file"] == str(folder / weight_map[t["name"]]), t["name"]
        tensor = shards[weight_map[t["name"]]][t["name"]]
        assert t["shape"] == list(tensor.shape) and t["params"] == tensor.numel()
    assert report["totals"]["params"] == sum(t.numel() for tensors in shards.values() for t in tensors.values())


def test_analyze_with_a_policy_over_shards(checkpoint):
    folder, shards, weight_map = checkpoint
    rows = by_name(cli_json("analyze", folder, "--rank", 2))
    for name, shard in weight_map.items():
        tensor = shards[shard][name]
        if not tensor.is_floating_point() or tensor.dim() < 2:
            assert rows[name]["status"] == "skipped", name
            continue
        m, n = tensor.shape[0], tensor.numel() // tensor.shape[0]
        s = singular_values(tensor)
        assert rows[name]["status"] == "factorized", name
        assert rows[name]["params_after"] == 2 * (m + n), name
        assert rows[name]["rel_error"] == pytest.approx(float(np.sqrt((s[2:] ** 2).sum() / (s**2).sum())), abs=1e-6)


# --- compress and expand -----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "index", "folder without index"])
def test_compress_writes_the_same_layout(checkpoint, tmp_path, form):
    folder, shards, weight_map = checkpoint
    if form == "folder without index":
        (folder / INDEX).unlink()
    inputs = _hashes(folder)
    path = folder / INDEX if form == "index" else folder
    result = cli("compress", path, "--rank", 2, "--json")
    assert result.exit_code == 0, result.stderr
    report = by_name(json.loads(result.stdout))
    out = tmp_path / "ckpt.lowrank"  # the default: <folder>.lowrank beside the folder
    assert out.is_dir()
    assert listing(tmp_path) == ["ckpt", "ckpt.lowrank"]
    # weight files named so that transformers refuses the folder (it would load them with random weights)
    assert listing(out) == sorted([LOWRANK_1, LOWRANK_2, LOWRANK_INDEX, "README.md", "config.json", "tokenizer.json"])
    assert (out / "config.json").read_text() == CONFIG
    assert _hashes(folder) == inputs

    # every tensor (or its two factors) lands in the shard that held it
    written = names_by_shard(out)
    expected = {}
    for name, shard in weight_map.items():
        shard = shard.replace(".safetensors", ".lowrank.safetensors")
        if report[name]["status"] == "factorized":
            expected |= {f"{name}.B": shard, f"{name}.A": shard}
        else:
            expected[name] = shard
    assert written == expected
    assert {"model.layers.0.weight", "model.layers.1.weight", "model.conv.weight"} <= {
        name for name, t in report.items() if t["status"] == "factorized"
    }

    index = json.loads((out / LOWRANK_INDEX).read_text())
    assert index["weight_map"] == written
    assert index["metadata"]["total_size"] == sum(tensor_bytes(out / shard) for shard in (LOWRANK_1, LOWRANK_2))


def test_compress_expand_roundtrip_keeps_each_shard(checkpoint, tmp_path):
    folder, shards, weight_map = checkpoint
    compressed = tmp_path / "ckpt.lowrank"
    report = by_name(cli_json("compress", folder, "--rank", 4))
    result = cli("expand", compressed, "--json")
    assert result.exit_code == 0, result.stderr
    dense = tmp_path / "ckpt.dense"  # the default beside the compressed folder, without .lowrank
    assert listing(tmp_path) == ["ckpt", "ckpt.dense", "ckpt.lowrank"]
    assert listing(dense) == listing(folder)
    assert (dense / "config.json").read_text() == CONFIG

    index = json.loads((dense / INDEX).read_text())
    assert index["weight_map"] == weight_map == names_by_shard(dense)
    assert index["metadata"]["total_size"] == sum(tensor_bytes(dense / shard) for shard in shards)
    for shard, tensors in shards.items():
        assert file_metadata(dense / shard) == METADATA[shard], shard
        raw_in, raw_out = raw_tensors(folder / shard), raw_tensors(dense / shard)
        stored, factors = load(dense / shard), load(compressed / shard.replace(".safetensors", ".lowrank.safetensors"))
        assert set(raw_out) == set(tensors)
        for name, tensor in tensors.items():
            assert raw_out[name][:2] == raw_in[name][:2], name  # dtype code and shape
            assert stored[name].dtype == tensor.dtype, name
            if report[name]["status"] == "factorized":
                error = relative_error(tensor, factors[f"{name}.B"], factors[f"{name}.A"])
                assert report[name]["rel_error"] == pytest.approx(error, rel=1e-6, abs=1e-9)
                rebuilt = float(
                    torch.linalg.vector_norm((stored[name] - tensor).double())
                    / torch.linalg.vector_norm(tensor.double())
                )
                assert rebuilt == pytest.approx(error, abs=1e-2 if tensor.dtype == torch.bfloat16 else 1e-5), name
            else:
                assert raw_out[name] == raw_in[name], name


def test_compress_to_one_file_and_expand_it(checkpoint, tmp_path):
    folder, shards, weight_map = checkpoint
    single = tmp_path / "merged.safetensors"
    report = by_name(cli_json("compress", folder, "--rank", 3, "-o", single))
    assert single.is_file()
    assert listing(tmp_path) == ["ckpt", "merged.safetensors"]
    expected = set()
    for name, t in report.items():
        expected |= {f"{name}.B", f"{name}.A"} if t["status"] == "factorized" else {name}
    assert set(raw_tensors(single)) == expected

    assert file_metadata(single)["shard"] == "first"  # one file: the first shard's metadata

    result = cli("expand", single)
    assert result.exit_code == 0, result.stderr
    dense = tmp_path / "merged.dense.safetensors"  # the default beside it
    assert listing(tmp_path) == ["ckpt", "merged.dense.safetensors", "merged.safetensors"]
    assert file_metadata(dense) == METADATA[SHARD_1]
    raw_out, expanded, factors = raw_tensors(dense), load(dense), load(single)
    assert set(raw_out) == set(weight_map)
    for name, shard in weight_map.items():
        tensor = shards[shard][name]
        assert raw_out[name][:2] == raw_tensors(folder / shard)[name][:2], name
        assert expanded[name].dtype == tensor.dtype and expanded[name].shape == tensor.shape, name
        if report[name]["status"] != "factorized":
            assert raw_out[name] == raw_tensors(folder / shard)[name], name
        elif tensor.dtype == torch.float32:  # B·A rebuilt: the same error as the factors make
            error = relative_error(tensor, factors[f"{name}.B"], factors[f"{name}.A"])
            rebuilt = float(torch.linalg.vector_norm(expanded[name] - tensor) / torch.linalg.vector_norm(tensor))
            assert rebuilt == pytest.approx(error, rel=1e-4, abs=1e-6), name


def test_expand_of_a_compressed_folder_to_one_file(checkpoint, tmp_path):
    folder, shards, weight_map = checkpoint
    assert cli("compress", folder, "--rank", 4).exit_code == 0
    dense = tmp_path / "dense.safetensors"
    result = cli("expand", tmp_path / "ckpt.lowrank", "-o", dense)
    assert result.exit_code == 0, result.stderr
    raw_out = raw_tensors(dense)
    assert set(raw_out) == set(weight_map)
    for name, shard in weight_map.items():
        assert raw_out[name][:2] == raw_tensors(folder / shard)[name][:2], name


# --- broken checkpoints ------------------------------------------------------------------------


def _index_name(folder) -> str:
    """The folder's index: model.safetensors.index.json, or model.lowrank.… in a compressed folder."""
    return INDEX if (folder / INDEX).exists() else LOWRANK_INDEX


def _shard(folder, shard: str) -> str:
    return shard if (folder / shard).exists() else shard.replace(".safetensors", ".lowrank.safetensors")


def _index(folder) -> dict:
    return json.loads((folder / _index_name(folder)).read_text())


def _write_index(folder, index) -> None:
    (folder / _index_name(folder)).write_text(json.dumps(index))


def missing_shard(folder):
    index = _index(folder)
    index["weight_map"]["model.layers.1.bias"] = "model-00003-of-00003.safetensors"
    _write_index(folder, index)
    return _index_name(folder), "model-00003-of-00003.safetensors"


def missing_shard_file(folder):
    shard = _shard(folder, SHARD_2)
    (folder / shard).unlink()
    return _index_name(folder), shard


def ghost_tensor(folder):
    index = _index(folder)
    index["weight_map"]["model.ghost.weight"] = _shard(folder, SHARD_1)
    _write_index(folder, index)
    return _index_name(folder), "'model.ghost.weight'"


def unindexed_tensor(folder):
    index = _index(folder)
    del index["weight_map"]["model.layers.1.bias"]
    _write_index(folder, index)
    return _index_name(folder), "'model.layers.1.bias'"


def misplaced_tensor(folder):
    index = _index(folder)
    index["weight_map"]["model.layers.1.bias"] = _shard(folder, SHARD_1)
    _write_index(folder, index)
    return _index_name(folder), "'model.layers.1.bias'"


def index_not_json(folder):
    (folder / INDEX).write_text('{"weight_map": {')
    return INDEX, INDEX


def index_without_weight_map(folder):
    _write_index(folder, {"metadata": {"total_size": 1}})
    return INDEX, "weight_map"


def index_weight_map_not_a_map(folder):
    _write_index(folder, {"weight_map": ["model.layers.0.weight"]})
    return INDEX, "weight_map"


def corrupt_shard(folder):
    (folder / SHARD_2).write_bytes(os.urandom(2048))
    return SHARD_2, SHARD_2


def truncated_shard(folder):
    data = (folder / SHARD_2).read_bytes()
    (folder / SHARD_2).write_bytes(data[:-40])
    return SHARD_2, SHARD_2


def duplicate_without_index(folder):
    (folder / INDEX).unlink()
    tensors = load(folder / SHARD_2)
    tensors["model.layers.0.bias"] = torch.randn(40)
    save(folder / SHARD_2, tensors)
    return None, "'model.layers.0.bias'"


def nan_in_second_shard(folder):
    """A valid file whose tensor only fails once compress has started writing the first shard."""
    tensors = load(folder / SHARD_2)
    tensors["model.layers.1.weight"][3, 3] = float("nan")
    save(folder / SHARD_2, tensors)
    return SHARD_2, "'model.layers.1.weight'"


BREAKAGES = [
    missing_shard,
    missing_shard_file,
    ghost_tensor,
    unindexed_tensor,
    misplaced_tensor,
    index_not_json,
    index_without_weight_map,
    index_weight_map_not_a_map,
    corrupt_shard,
    truncated_shard,
    duplicate_without_index,
    nan_in_second_shard,
]


@pytest.mark.parametrize("command", [["analyze"], ["compress", "--rank", "2"]], ids=lambda c: c[0])
@pytest.mark.parametrize(
    ("breakage", "form"),
    [
        (b, form)
        for b in BREAKAGES
        for form in ("folder", "index")
        if not (b is duplicate_without_index and form == "index")
    ],
    ids=lambda x: x if isinstance(x, str) else x.__name__,
)
def test_broken_checkpoint_fails_cleanly(tmp_path, command, form, breakage):
    folder, _ = write_checkpoint(tmp_path / "ckpt", _shards())
    culprit, named = breakage(folder)
    path = folder / INDEX if form == "index" else folder
    before, inputs = listing(tmp_path), _hashes(folder)
    result = cli(command[0], path, *command[1:])
    shown = str(folder / culprit) if culprit else str(folder)
    assert_clean_failure(result, 1, shown, named)
    assert listing(tmp_path) == before  # no ckpt.lowrank, no .ckpt.lowrank.*.tmp
    assert temp_files(tmp_path) == [] and temp_files(folder) == []
    assert _hashes(folder) == inputs


@pytest.mark.parametrize("breakage", [missing_shard_file, unindexed_tensor, ghost_tensor], ids=lambda f: f.__name__)
def test_expand_of_a_broken_compressed_folder(checkpoint, tmp_path, breakage):
    folder, _, _ = checkpoint
    assert cli("compress", folder, "--rank", 2).exit_code == 0
    compressed = tmp_path / "ckpt.lowrank"
    culprit, named = breakage(compressed)
    before = listing(tmp_path)
    result = cli("expand", compressed)
    assert_clean_failure(result, 1, str(compressed / culprit), named)
    assert listing(tmp_path) == before
    assert temp_files(tmp_path) == []


# --- where the output may go ---------------------------------------------------------------------


def _target(folder, target):
    return {
        "folder": folder,
        "folder/": folder / "sub" / "..",
        "folder/new": folder / "new",
        "folder/out.safetensors": folder / "out.safetensors",
        "index": folder / INDEX,
        "shard": folder / SHARD_1,
    }[target]


@pytest.mark.parametrize("command", ["compress", "expand"])
@pytest.mark.parametrize("target", ["folder", "folder/", "folder/new", "folder/out.safetensors", "index", "shard"])
@pytest.mark.parametrize("force", [False, True])
def test_output_in_or_at_the_input_folder_is_a_usage_error(checkpoint, tmp_path, command, target, force):
    folder, _, _ = checkpoint
    if command == "expand":
        assert cli("compress", folder, "--rank", 2).exit_code == 0
        folder = tmp_path / "ckpt.lowrank"
    (folder / "sub").mkdir()
    out = _target(folder, target)
    before, inputs = listing(tmp_path), _hashes(folder)
    result = cli(
        command, folder, *(["--rank", "2"] if command == "compress" else []), "-o", out, *(["--force"] if force else [])
    )
    assert_clean_failure(result, 2, str(out))
    assert listing(tmp_path) == before and temp_files(tmp_path) == []
    assert _hashes(folder) == inputs


@pytest.mark.parametrize("target", ["folder", "index", "shard", "folder/new", "folder/out.safetensors"])
def test_output_in_the_folder_of_an_index_is_a_usage_error(checkpoint, tmp_path, target):
    """The same checkpoint passed as its index file: its folder is still the input folder."""
    folder, _, _ = checkpoint
    out = _target(folder, target)
    path = folder / INDEX
    before, inputs = listing(tmp_path), _hashes(folder)
    result = cli("compress", path, "--rank", 2, "-o", out)
    assert_clean_failure(result, 2, str(out))
    assert listing(tmp_path) == before and temp_files(tmp_path) == []
    assert _hashes(folder) == inputs


def test_existing_output_folder_needs_force(checkpoint, tmp_path):
    folder, shards, weight_map = checkpoint
    out = tmp_path / "ckpt.lowrank"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    result = cli("compress", folder, "--rank", 2)
    assert_clean_failure(result, 1, str(out), "--force")
    assert listing(out) == ["stale.txt"]
    assert listing(tmp_path) == ["ckpt", "ckpt.lowrank"]

    result = cli("compress", folder, "--rank", 2, "--force")
    assert result.exit_code == 0, result.stderr
    assert listing(tmp_path) == ["ckpt", "ckpt.lowrank"]  # no .old or .tmp folder left beside it
    assert listing(out) == sorted([LOWRANK_1, LOWRANK_2, LOWRANK_INDEX, "README.md", "config.json", "tokenizer.json"])
    assert json.loads((out / LOWRANK_INDEX).read_text())["weight_map"] == names_by_shard(out)


def test_existing_output_file_for_a_folder_output(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    out = tmp_path / "ckpt.lowrank"
    out.write_text("a file, not a folder")
    result = cli("compress", folder, "--rank", 2, "--force")
    assert_clean_failure(result, 1, str(out))
    assert out.read_text() == "a file, not a folder"
    assert listing(tmp_path) == ["ckpt", "ckpt.lowrank"]


def test_sentence_transformers_module_folders_travel_with_the_model(tmp_path):
    # modules.json names 1_Pooling/ and 2_Dense/: SentenceTransformer(out) fails without them.
    folder, _ = write_checkpoint(
        tmp_path / "st", {"model.safetensors": {"w": low_rank(24, 16, 2, seed=5)}}, index=False
    )
    modules = [{"idx": 0, "path": ""}, {"idx": 1, "path": "1_Pooling"}, {"idx": 2, "path": "2_Dense"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 16}')
    (folder / "2_Dense").mkdir()
    save(folder / "2_Dense" / "model.safetensors", {"linear.weight": torch.ones(4, 16)})
    (folder / "checkpoint-500").mkdir()  # not named by modules.json: a trainer's, not the model's
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(b"x" * 64)
    inputs = _hashes(folder)

    assert cli("compress", folder, "--rank", 2, "-o", tmp_path / "small").exit_code == 0
    assert cli("expand", tmp_path / "small", "-o", tmp_path / "dense").exit_code == 0
    common = ["1_Pooling", "2_Dense", "config.json", "modules.json", "tokenizer.json"]
    assert listing(tmp_path / "small") == sorted([*common, "README.md", "model.lowrank.safetensors"])
    assert listing(tmp_path / "dense") == sorted([*common, "model.safetensors"])
    for out in (tmp_path / "small", tmp_path / "dense"):
        assert (out / "1_Pooling" / "config.json").read_bytes() == (folder / "1_Pooling" / "config.json").read_bytes()
        assert (out / "2_Dense" / "model.safetensors").read_bytes() == (
            folder / "2_Dense" / "model.safetensors"
        ).read_bytes()
    assert _hashes(folder) == inputs


def test_weights_in_other_formats_stay_behind(tmp_path):
    # A folder converted from pytorch_model.bin still holds it: copied, it would put the dense model back.
    folder, _ = write_checkpoint(tmp_path / "m", {"model.safetensors": {"w": low_rank(24, 16, 2, seed=6)}}, index=False)
    for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"):
        (folder / name).write_bytes(b"\x80\x02" + b"x" * 4096)
    assert cli("compress", folder, "--rank", 2, "-o", tmp_path / "small").exit_code == 0
    assert listing(tmp_path / "small") == ["README.md", "config.json", "model.lowrank.safetensors", "tokenizer.json"]
    assert len(listing(folder)) == 6
