"""Samples of a text (ops.samples): what is read, how it is cut, --split auto; and the statistics'
embedding lookups and model fingerprint (issues 17 and 19)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, cli, load, save, sha256
from test_evaluate import compressed, line_text, tiny_folder

import lowrank_cli
from lowrank_cli.io.calibration import read_calibration
from lowrank_cli.ops.samples import BLOCK, hard_wrapped, read_samples
from lowrank_cli.ops.settings import Split


class WordTokenizer:
    """Whitespace words as ids (w<N> -> N), [CLS]=1 and [SEP]=2 around a text; counts what it reads."""

    def __init__(self) -> None:
        self.characters = 0

    def __call__(self, text, add_special_tokens=True):
        texts = [text] if isinstance(text, str) else text
        self.characters += sum(len(t) for t in texts)
        encoded = [[int(w[1:]) + 10 if w.startswith("w") else 3 for w in t.split()] for t in texts]
        if add_special_tokens:
            encoded = [[1, *ids, 2] for ids in encoded]
        return {"input_ids": encoded[0] if isinstance(text, str) else encoded}


def test_a_large_file_is_read_only_where_it_is_sampled(tmp_path):
    """50 MB in one line: 512 tokens of windows read a few blocks, spread over the whole file."""
    words = 6_000_000
    path = tmp_path / "big.txt"
    with open(path, "w") as handle:
        for start in range(0, words, 100_000):
            handle.write(" ".join(f"w{i}" for i in range(start, start + 100_000)) + " ")
    tokenizer = WordTokenizer()
    found = read_samples(tokenizer, path, seq_len=34, tokens=512, split=Split.windows)
    assert 12 <= len(found.ids) <= 20 and all(len(ids) == 34 for ids in found.ids)
    assert tokenizer.characters < 40 * BLOCK < path.stat().st_size / 10  # a few blocks, not 50 MB
    firsts = [ids[1] - 10 for ids in found.ids]  # the word index each window starts at
    assert firsts == sorted(firsts) and firsts[0] < words / 10 and firsts[-1] > 0.8 * words  # the whole file
    for ids in found.ids:  # consecutive words of the text: nothing cut inside a word
        assert np.all(np.diff(ids[1:-1]) == 1)
    assert found.text_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_small_file_gives_consecutive_windows_of_all_of_it(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(" ".join(f"w{i}" for i in range(100)))
    found = read_samples(WordTokenizer(), path, seq_len=12, tokens=10_000, split=Split.windows)
    assert [ids[1:-1] for ids in found.ids] == [list(range(10 + 10 * k, 20 + 10 * k)) for k in range(10)]


def test_lines_are_samples_and_blocks_never_cut_a_line(tmp_path):
    path = tmp_path / "lines.txt"
    lines = [" ".join(f"w{i * 7 + j}" for j in range(1 + i % 5)) for i in range(40_000)]  # ~1.1 MB
    path.write_text("\n".join(lines) + "\n")
    found = read_samples(WordTokenizer(), path, seq_len=8, tokens=2_000, split=Split.lines)
    expected = {tuple(int(w[1:]) + 10 for w in line.split()) for line in lines}
    assert all(tuple(ids[1:-1]) in expected for ids in found.ids)  # every sample a whole line
    assert found.split == Split.lines and abs(found.tokens - 2_000) < 300


@pytest.mark.parametrize("split", [Split.lines, Split.windows])
def test_a_bad_byte_is_named_by_its_offset_in_the_file_whatever_is_sampled(tmp_path, split):
    """A byte that is not UTF-8 past the first block: 16 tokens sample around it, a million read it all;
    both fail alike, at its offset in the file (it was reported within its 64 KiB block, or not at all)."""
    lines = b"".join(b" ".join(b"w%d" % (i * 10 + j) for j in range(10)) + b"\n" for i in range(8_000))
    data = lines[: 5 * BLOCK + 123] + b"\xff" + lines[5 * BLOCK + 123 :]
    path = tmp_path / "text.txt"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    assert offset > BLOCK  # not in the first block, which every run reads
    for tokens in (16, 1_000_000):
        with pytest.raises(lowrank_cli.UsageError, match=f"bad byte at offset {offset:,} of the file"):
            read_samples(WordTokenizer(), path, seq_len=12, tokens=tokens, split=split)
    path.write_bytes(lines[:-1] + "é".encode())  # a character that ends the file is no cut sequence
    assert read_samples(WordTokenizer(), path, seq_len=12, tokens=16, split=split).text_sha256 == sha256(path)
    path.write_bytes(lines + "é".encode()[:1])  # the file ends inside a character
    with pytest.raises(lowrank_cli.UsageError, match=f"bad byte at offset {len(lines):,} of the file"):
        read_samples(WordTokenizer(), path, seq_len=12, tokens=16, split=split)


@pytest.mark.parametrize("content", [b"", b"  \n\n", b"\x00\x01\xfe\xff" * 64], ids=["empty", "blank", "binary"])
def test_an_eval_text_is_named_as_eval_text_not_text(tmp_path, content):
    folder = tiny_folder(tmp_path, "encoder")
    text = tmp_path / "eval.bin"
    text.write_bytes(content)
    train = line_text(tmp_path / "train.txt")
    for args in (
        ["compress", folder, "--fidelity", "0.9", "--eval-text", text, "-o", tmp_path / "out"],
        ["heal", folder, compressed(folder, tmp_path), "--text", train, "--eval-text", text, "-o", tmp_path / "out"],
    ):
        result = cli(*args)
        assert_clean_failure(result, 2, str(text), "--eval-text")
        assert "--text" not in result.stderr.replace("--eval-text", "")
        assert not (tmp_path / "out").exists()


def test_split_auto_tells_sentences_from_wrapped_prose(tmp_path):
    pytest.importorskip("transformers")
    folder = tiny_folder(tmp_path, "encoder")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    sentences = line_text(tmp_path / "sentences.txt", lines=40)
    found = read_samples(tok, sentences, seq_len=32, split=Split.auto)
    assert found.split == Split.lines and "split lines" in found.notes[0]
    assert found.notes[0].endswith("; split windows|lines to choose")  # a Python caller's keyword, not --split
    prose = tmp_path / "prose.txt"
    words = (tmp_path / "sentences.txt").read_text().split()
    wrapped, line = [], ""
    for word in words:  # wrapped at 60 columns, as licences and READMEs are
        if len(line) + len(word) + 1 > 60:
            wrapped.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    prose.write_text("\n".join(wrapped) + "\n")
    assert hard_wrapped(prose.read_text().splitlines())
    assert read_samples(tok, prose, seq_len=32, split=Split.auto).split == Split.windows
    few = tmp_path / "few.txt"
    few.write_text("the model reads every word of this text\nand a short line of the text\n")
    assert read_samples(tok, few, seq_len=8, split=Split.auto).split == Split.windows  # too few lines to say


# --- calibrate: its outputs and statistics ---------------------------------------------------------


@pytest.mark.parametrize("target", ["weights", "text"])
def test_calibrate_never_writes_over_its_inputs(tmp_path, target):
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "calib.txt")
    victim = folder / "model.safetensors" if target == "weights" else text
    before = sha256(victim)
    result = cli("calibrate", folder, "-o", victim, "--text", text, "--force", "--no-sensitivity")
    assert_clean_failure(result, 2, str(victim), "input")
    assert sha256(victim) == before


def test_calibrate_counts_each_tables_lookups(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "calib.txt")
    stats = tmp_path / "stats.safetensors"
    lowrank_cli.calibrate(folder, stats, text=text, sensitivity=False)
    counts = read_calibration(stats).token_counts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = [i for line in text.read_text().splitlines() for i in tok(line)["input_ids"]]
    expected = np.bincount(ids, minlength=len(tok))
    np.testing.assert_array_equal(counts["embeddings.word_embeddings.weight"].numpy(), expected)
    assert float(counts["embeddings.position_embeddings.weight"].sum()) == len(ids)


def test_a_table_is_cut_by_its_lookups(tmp_path):
    """The written factors minimise Σ d_i‖E_i − E′_i‖² (d = p + 0.1/V): the optimum, computed in numpy."""
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "calib.txt")
    stats = tmp_path / "stats.safetensors"
    lowrank_cli.calibrate(folder, stats, text=text, sensitivity=False)
    out = tmp_path / "c"
    name = "embeddings.word_embeddings.weight"
    report = lowrank_cli.compress(folder, out, rank=3, include=[name], calibration=stats)
    row = next(t for t in report.tensors if t.name == name)
    written = {k: v for f in out.glob("*.safetensors") for k, v in load(f).items()}
    e = load(folder / "model.safetensors")[name].double().numpy()
    counts = read_calibration(stats).token_counts[name].numpy()
    d = counts / counts.sum() + 0.1 / len(counts)
    u, s, vh = np.linalg.svd(np.sqrt(d)[:, None] * e, full_matrices=False)
    best = ((u[:, :3] * s[:3]) @ vh[:3]) / np.sqrt(d)[:, None]
    product = written[f"{name}.B"].double().numpy() @ written[f"{name}.A"].double().numpy()
    np.testing.assert_allclose(product, best, rtol=1e-4, atol=1e-5)
    weighted = np.sqrt((d * ((e - product) ** 2).sum(1)).sum() / (d * (e**2).sum(1)).sum())
    assert row.output_error == pytest.approx(weighted, rel=1e-5)
    plain = np.linalg.svd(e, full_matrices=False)
    cut = (plain[0][:, :3] * plain[1][:3]) @ plain[2][:3]
    assert weighted < np.sqrt((d * ((e - cut) ** 2).sum(1)).sum() / (d * (e**2).sum(1)).sum())


def test_statistics_of_another_model_are_refused_unless_asked(tmp_path):
    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "calib.txt")
    stats = tmp_path / "stats.safetensors"
    lowrank_cli.calibrate(folder, stats, text=text, sensitivity=False)
    assert set(json.loads(load_metadata(stats))["fingerprint"])  # recorded
    weights = load(folder / "model.safetensors")
    other = save(tmp_path / "other.safetensors", {k: v + 1e-3 * torch.randn_like(v) for k, v in weights.items()})
    refused = cli("compress", other, "--rank", "3", "--calibration", stats, "-o", tmp_path / "o.safetensors")
    assert_clean_failure(refused, 1, "another model", "--other-model")
    forced = cli("compress", other, "--rank", "3", "--calibration", stats, "--other-model", "-o", tmp_path / "o2")
    assert forced.exit_code == 0, forced.output
    half = save(tmp_path / "bf16.safetensors", {k: v.to(torch.bfloat16) for k, v in weights.items()})
    same = cli("compress", half, "--rank", "3", "--calibration", stats, "-o", tmp_path / "o3.safetensors")
    assert same.exit_code == 0, same.output  # a bfloat16 copy is the same model


def load_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["lowrank_calibration"]
