"""Samples of a text file for a model: windows of tokens or lines, taken evenly over the whole file.

calibrate, evaluate, heal and compress --fidelity read their text here. Only what is sampled is
read and tokenized: pieces of MIN_READ to BLOCK bytes at evenly spaced offsets, as many as the asked
tokens need (at least one per window), so a 50 MB file costs what its samples cost; the whole file
is tokenized only when the samples need about half of it. The hash is computed streaming, and the
same pass checks that the whole file is UTF-8 (text_digest), so a file passes or fails alike
whatever is sampled of it, and a bad byte is named by its offset in the file.
"""

from __future__ import annotations

import codecs
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowrank_cli.errors import Note, UsageError, arg
from lowrank_cli.io.paths import require_file
from lowrank_cli.ops.settings import CALIBRATE_TOKENS, Split

BLOCK = 1 << 16  # bytes read and tokenized at a time at most (64 KiB)
MIN_READ = 1 << 12  # … and at least, where the file is sampled in pieces (4 KiB)
LINE_SHAPED_LINES = 16  # split auto: lines only when the probe holds at least this many lines …
LINE_SHAPED_SHARE = 0.9  # … this share of them fit in --seq-len tokens …
WRAPPED_SHARE = 0.5  # … and it is not prose wrapped at a width: this share of lines run on and fill it
WRAP_FILL = 0.75  # a wrapped line fills at least this share of the width (the 95th percentile of lengths)


@dataclass
class TextSamples:
    """Token ids of each sample (special tokens included), and how they were cut."""

    ids: list[list[int]]
    split: Split  # windows or lines, as chosen (auto resolved)
    text_sha256: str
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.ids)


def read_samples(
    tokenizer,
    path: str | Path,
    *,
    seq_len: int,
    tokens: int = CALIBRATE_TOKENS,
    samples: int | None = None,
    split: Split = Split.auto,
    flag: str = "text",
) -> TextSamples:
    """Samples of about `tokens` tokens (at most `samples` of them) taken evenly over the text file.

    split: `windows` cuts consecutive windows of seq_len tokens; `lines` makes each non-empty line one
    sample (cut at seq_len); `auto` takes lines when the file is line-shaped (many lines, most shorter
    than seq_len tokens, not hard-wrapped prose) and windows otherwise, with a note saying which.
    Each sample is framed by the tokenizer's special tokens ([CLS] … [SEP]).
    flag: the argument that gave the file (text, eval_text), named in the errors about it.
    """
    if seq_len < 2:
        raise UsageError(f"{arg('seq_len')} must be at least 2, got {seq_len}")
    for argument, value in (("tokens", tokens), ("samples", samples)):
        if value is not None and value < 1:
            raise UsageError(f"{arg(argument)} must be at least 1, got {value}")
    path = Path(path)
    size = _check_text(path, flag)
    digest = text_digest(path, flag)  # the whole file is UTF-8 before any of it is sampled
    tokenizer.model_max_length = 1 << 62  # the text is cut below; silence the length warning
    prefix, suffix = special_tokens(tokenizer)
    content = seq_len - len(prefix) - len(suffix)
    if content < 1:
        raise UsageError(f"{arg('seq_len')} {seq_len} leaves no room beside the special tokens; raise {arg('seq_len')}")
    with open(path, "rb") as handle:
        first = _decode(_aligned(handle, 0, size, Split.windows))
        if not first.strip() and size <= BLOCK:
            raise UsageError(f"{path}: has no text; give a UTF-8 text file with {arg(flag)}")
        notes = []
        if split == Split.auto:
            split = Split.lines if line_shaped(tokenizer, first, content) else Split.windows
            why = f"{path.name}: split {split.value} ({_why(split)})"
            notes.append(Note(f"{why}; {arg('split')} windows|lines to choose"))
        probe_ids = len(tokenizer(first, add_special_tokens=False)["input_ids"]) if first.strip() else 0
        bytes_per_token = len(first.encode()) / probe_ids if probe_ids else 4.0
        wanted = tokens if samples is None else min(tokens, samples * seq_len)
        starts, length = _blocks(size, wanted, bytes_per_token, seq_len if split == Split.windows else None)
        found: list[list[int]] = []
        for start in starts:
            text = _decode(_aligned(handle, start, size, split, length))
            found += _cut(tokenizer, text, split, content, prefix, suffix)
    if not found:
        if split == Split.lines:
            raise UsageError(f"{path}: has no text; give a UTF-8 text file with {arg(flag)}")
        raise UsageError(
            f"{path}: has fewer tokens than one window of {seq_len}; lower {arg('seq_len')} or give more text"
        )
    chosen = spread(found, sample_count(found, tokens, samples))
    return TextSamples(chosen, split, digest, notes)


def line_shaped(tokenizer, text: str, content: int) -> bool:
    """Whether text is one sample per line: many lines, most within `content` tokens, few running on."""
    lines = [line.strip() for line in text.splitlines()]
    lines = lines[:-1] if len(lines) > 1 else lines  # the block's last line may be cut
    filled = [line for line in lines if line]
    if len(filled) < LINE_SHAPED_LINES:
        return False
    lengths = [len(ids) for ids in tokenizer(filled, add_special_tokens=False)["input_ids"]]
    if sum(length <= content for length in lengths) < LINE_SHAPED_SHARE * len(filled):
        return False
    return not hard_wrapped(lines)


def hard_wrapped(lines: list[str]) -> bool:
    """Prose wrapped at a width: most lines run on into the next (no sentence end, the next in lower
    case) and fill the width (at least WRAP_FILL of the longest lines' length)."""
    pairs = [(line, following) for line, following in zip(lines, lines[1:], strict=False) if line and following]
    if not pairs:
        return False
    runs_on = [line for line, following in pairs if line[-1] not in ".!?:;\"')]" and following[0].islower()]
    width = sorted(len(line) for line in lines if line)[int(0.95 * (len([x for x in lines if x]) - 1))]
    filled = [line for line in runs_on if len(line) >= WRAP_FILL * width]
    return len(runs_on) >= WRAPPED_SHARE * len(pairs) and len(filled) >= WRAPPED_SHARE * len(runs_on)


def _why(split: Split) -> str:
    if split == Split.lines:
        return "the text is one short sample per line"
    return "the text is not one short sample per line"


def sample_count(samples: list[list[int]], tokens: int, cap: int | None = None) -> int:
    """How many samples of their mean length hold about `tokens` tokens (at least one, at most all or cap)."""
    mean = sum(len(ids) for ids in samples) / len(samples)
    return max(1, min(len(samples), cap or len(samples), round(tokens / mean)))


def spread(items: list, count: int) -> list:
    """`count` of the items evenly over the whole list (all of them when there are no more), in order."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def batches(
    samples: list[list[int]], batch_size: int, device: str, pad: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, attention mask) batches of batch_size samples, by length so that padding stays short.

    Windows are all one length (no padding); lines are padded to the longest of their batch, and the
    mask marks the padding.
    """
    if batch_size < 1:
        raise UsageError(f"{arg('batch_size')} must be at least 1, got {batch_size}")
    ordered = sorted(samples, key=len)
    out = []
    for start in range(0, len(ordered), batch_size):
        group = ordered[start : start + batch_size]
        width = max(len(ids) for ids in group)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in group], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in group], device=device)
        out.append((ids, mask))
    return out


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (BERT: [CLS], [SEP]; GPT-2: none).

    The model sees those tokens in every real input, and their activations are often the largest
    (attention sinks): samples without them miss the directions that matter most.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


def text_digest(path: str | Path, flag: str = "text") -> str:
    """The file's SHA-256, read in chunks; a byte that is not UTF-8 anywhere in it is a UsageError naming
    its offset in the file (not in the chunk), so the check does not depend on what is sampled."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the chunk in the file
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            pending = len(decoder.getstate()[0])  # a sequence the last chunk cut, decoded with this one
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:  # exc.start counts from the pending bytes
                raise _not_utf8(path, offset - pending + exc.start, flag) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:  # the file ends inside a sequence
        raise _not_utf8(path, offset - len(exc.object) + exc.start, flag) from None
    return digest.hexdigest()


def _not_utf8(path: str | Path, offset: int, flag: str) -> UsageError:
    fix = f"give a UTF-8 text file with {arg(flag)}"
    return UsageError(f"{path}: is not UTF-8 text (a bad byte at offset {offset:,} of the file); {fix}")


def _check_text(path: Path, flag: str = "text") -> int:
    """The text file's size; a missing file, a folder or what is not a regular file is refused (exit 1)."""
    require_text(path, flag)
    size = os.path.getsize(path)
    if size == 0:
        raise UsageError(f"{path}: has no text; give a UTF-8 text file with {arg(flag)}")
    return size


def require_text(path: str | Path, flag: str = "text") -> Path:
    """A text input checked up front, before any model is loaded: a regular file, or a CheckpointError."""
    return require_file(path, f"give a UTF-8 text file with {arg(flag)}")


def _blocks(size: int, wanted: int, bytes_per_token: float, window: int | None) -> tuple[list[int], int]:
    """Where to read and how much: (offsets, bytes each). Twice the wanted tokens' bytes in all (windows
    lose their tails), in at least as many pieces as there are samples (one window each; lines: one
    piece per MIN_READ), spread evenly over the file; the whole file in BLOCK pieces once that is half of it."""
    needed = math.ceil(2 * wanted * bytes_per_token)
    pieces = math.ceil(wanted / window) if window else math.ceil(needed / MIN_READ)
    length = min(
        BLOCK, max(MIN_READ, math.ceil(needed / max(pieces, 1)), 2 * (window or 0) * math.ceil(bytes_per_token))
    )
    pieces = max(pieces, math.ceil(needed / length))
    if pieces * length * 2 >= size:
        return list(range(0, size, BLOCK)), BLOCK
    return sorted({i * size // pieces for i in range(pieces)}), length


def _aligned(handle, start: int, size: int, split: Split, length: int = BLOCK) -> bytes:
    """BLOCK bytes from `start`, moved on to a boundary: after a newline (lines) or at a space (windows).

    ASCII bytes never occur inside a UTF-8 sequence, so both boundaries are character boundaries; a
    window block starts at its whitespace so that a tokenizer that keeps the space with the word
    (GPT-2) reads the words as it would in the whole text. The block ends at its last such boundary
    too, unless it ends the file. A block with no boundary in it gives nothing, but for the file's
    first line, whose beginning is a sample however long the line is.
    """
    handle.seek(max(start - 1, 0))
    data = handle.read(length + (1 if start else 0))
    before, data = (data[:1], data[1:]) if start else (b"\n", data)
    if not data:
        return b""
    if split == Split.lines:
        if before != b"\n":  # the middle of a line: the next line begins the block
            cut = data.find(b"\n")
            if cut < 0:
                return b""
            data = data[cut + 1 :]
        if start + length < size:
            last = data.rfind(b"\n") + 1
            data = data[:last] if last > 0 else (data if start == 0 else b"")
        return data
    if not before.isspace():  # the middle of a word: the block begins at the next whitespace
        match = _SPACE.search(data)
        if match is None:
            return b""
        data = data[match.start() :]
    if start + length < size:
        ends = [match.start() for match in _SPACE.finditer(data, max(len(data) - 4096, 0))]
        data = data[: ends[-1]] if ends and ends[-1] > 0 else b""
    return data


_SPACE = re.compile(rb"\s")


def _decode(data: bytes) -> str:
    """A piece of a file text_digest found UTF-8: it starts at a character boundary (_aligned), and a
    character the piece's end cuts (a first line longer than the piece) is left out."""
    return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)


def _cut(tokenizer, text: str, split: Split, content: int, prefix: list[int], suffix: list[int]) -> list[list[int]]:
    if not text.strip():
        return []
    if split == Split.lines:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        encoded = tokenizer(lines, add_special_tokens=False)["input_ids"]
        return [prefix + ids[:content] + suffix for ids in encoded if ids]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [prefix + ids[i : i + content] + suffix for i in range(0, len(ids) - content + 1, content)]
