"""Broken and odd safetensors files, built byte by byte without any safetensors writer.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON
(`{NAME: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {str: str}}`, padded
with spaces), then the tensor data; offsets count from the end of the header.

`broken_files()` gives named files every loader must refuse, each with a word its refusal should
contain; `odd_files()` gives files the official loader accepts although they look unusual;
`truncations()` cuts a valid file at every interesting point; `files()` is a hypothesis strategy
of files, valid or damaged by one of many mutations.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st

# dtype code -> bytes per element, for every code safetensors 0.8 knows (sub-byte ones aside),
# and two it does not.
ITEM_SIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
}
FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
UNKNOWN_DTYPES = ["F128", "f32", "FLOAT", ""]

FIELDS = ("dtype", "shape", "data_offsets")
Header = dict  # the JSON object of a header


def encode(header: Header | list | str | bytes, data: bytes = b"", *, pad: bool = True) -> bytes:
    """length + header + data; a header that is not bytes is written as JSON."""
    raw = header if isinstance(header, bytes) else json.dumps(header, ensure_ascii=False).encode("utf-8")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def layout(tensors: dict[str, tuple[str, list[int]]], metadata: dict | None = None) -> tuple[Header, int]:
    """A valid header for tensors (name -> (dtype, shape)) stored back to back; and the data size."""
    header: Header = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = ITEM_SIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def tensor_data(dtype: str, count: int, rng: np.random.Generator) -> bytes:
    """`count` finite values of `dtype` (floats in ±2, booleans 0/1, any integer bits)."""
    if dtype in FLOATS:
        return rng.uniform(-2, 2, count).astype(FLOATS[dtype]).tobytes()
    if dtype == "BF16":  # the upper halves of float32 values
        return (rng.uniform(-2, 2, count).astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    if dtype in ("F8_E4M3", "F8_E5M2"):  # sign, exponent and mantissa of small normal numbers
        return rng.integers(0x20, 0x40, count).astype(np.uint8).tobytes()
    if dtype == "BOOL":
        return rng.integers(0, 2, count).astype(np.uint8).tobytes()
    return rng.integers(0, 256, count * ITEM_SIZE[dtype]).astype(np.uint8).tobytes()


def build(tensors: dict[str, tuple[str, list[int]]], metadata: dict | None = None, seed: int = 0) -> bytes:
    """A valid file holding finite random values."""
    header, size = layout(tensors, metadata)
    rng = np.random.default_rng(seed)
    data = b"".join(tensor_data(dtype, int(np.prod(shape, dtype=np.int64)), rng) for dtype, shape in tensors.values())
    assert len(data) == size
    return encode(header, data)


BASE_TENSORS = {"w": ("F32", [6, 5]), "b": ("F32", [6]), "ids": ("I64", [3])}


def base_file() -> bytes:
    """A small valid file: a 6×5 matrix, a bias and integer ids, with metadata."""
    return build(BASE_TENSORS, {"format": "pt"})


def _with_entry(change: Callable[[dict], object]) -> bytes:
    """The base file with its matrix's entry changed in place (data unchanged)."""
    header, size = layout(BASE_TENSORS, {"format": "pt"})
    change(header["w"])
    return encode(header, bytes(size))


def _with_entry_replaced(value: object) -> bytes:
    header, size = layout(BASE_TENSORS, {"format": "pt"})
    header["w"] = value
    return encode(header, bytes(size))


def _with_offsets(offsets: dict[str, list[int]], data_size: int | None = None) -> bytes:
    header, size = layout(BASE_TENSORS, {"format": "pt"})
    for name, pair in offsets.items():
        header[name]["data_offsets"] = pair
    return encode(header, bytes(size if data_size is None else data_size))


def _raw_header(text: str, data_size: int) -> bytes:
    return encode(text.encode("utf-8"), bytes(data_size))


def broken_files() -> dict[str, tuple[bytes, str]]:
    """Named files the official loader refuses, each with a word (regex) its message should hold."""
    header, size = layout(BASE_TENSORS, {"format": "pt"})
    valid = base_file()
    header_len = int.from_bytes(valid[:8], "little")
    body = valid[8:]
    w_offsets = header["w"]["data_offsets"]
    b_offsets = header["b"]["data_offsets"]
    files = {
        # the 8-byte length
        "empty": (b"", "small|short|eof"),
        "length larger than the file": (struct.pack("<Q", header_len + 4096) + body, "header|incomplete|small"),
        "length zero": (struct.pack("<Q", 0) + body, "json|eof|header"),
        "length 2**63": (struct.pack("<Q", 2**63) + body, "large|header"),
        "length 2**64-1": (struct.pack("<Q", 2**64 - 1) + body, "large|header"),
        "length past the loader's limit": (struct.pack("<Q", 100_000_001) + body, "large|header"),
        # the header's text
        "header not JSON": (encode(b"{not json at all", bytes(size)), "json"),
        "header not UTF-8": (encode(b'{"w\xff\xfe": {}}', bytes(size)), "utf"),
        "header JSON list": (encode([], bytes(size)), "json|sequence|type"),
        "header JSON string": (encode("w", bytes(size)), "json|string|type"),
        "header JSON null": (encode(b"null", bytes(size)), "json|null|type"),
        "header with NUL padding": (encode(json.dumps(header).encode() + b"\0" * 8, bytes(size), pad=False), "json"),
        "header deeply nested": (
            _raw_header(
                '{"w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120], "x": '
                + "[" * 5000
                + "]" * 5000
                + "}}",
                size,
            ),
            "json|recursion",
        ),
        "metadata not a string map": (encode({**header, "__metadata__": {"format": 1}}, bytes(size)), "json|string"),
        "metadata a list": (encode({**header, "__metadata__": ["pt"]}, bytes(size)), "json|map|sequence"),
        "duplicate metadata": (
            _raw_header(
                '{"__metadata__": {}, "__metadata__": {}, '
                + json.dumps({k: v for k, v in header.items() if k != "__metadata__"})[1:],
                size,
            ),
            "json|duplicate",
        ),
        # one tensor entry of the wrong shape
        "entry missing dtype": (_with_entry(lambda e: e.pop("dtype")), "dtype|json"),
        "entry missing shape": (_with_entry(lambda e: e.pop("shape")), "shape|json"),
        "entry missing data_offsets": (_with_entry(lambda e: e.pop("data_offsets")), "offsets|json"),
        "entry a list": (_with_entry_replaced(["F32", [6, 5]]), "json|sequence|type|length"),
        "entry null": (_with_entry_replaced(None), "json|null|type"),
        "entry a string": (_with_entry_replaced("F32"), "json|string|type"),
        "dtype a number": (_with_entry(lambda e: e.update(dtype=4)), "json|type|dtype"),
        "shape a string": (_with_entry(lambda e: e.update(shape="6x5")), "json|type|shape"),
        "shape of floats": (_with_entry(lambda e: e.update(shape=[6.0, 5.0])), "json|type|float"),
        "negative shape": (_with_entry(lambda e: e.update(shape=[-6, -5])), "json|value|usize"),
        "offsets a dict": (_with_entry(lambda e: e.update(data_offsets={"start": 0})), "json|type|map"),
        "three offsets": (_with_entry(lambda e: e.update(data_offsets=[0, 60, 120])), "json|length"),
        "unknown dtype": (_with_entry(lambda e: e.update(dtype="F128")), "json|variant|dtype|F128"),
        # sizes and offsets
        "shape larger than its bytes": (_with_entry(lambda e: e.update(shape=[6, 6])), "offset|shape|size"),
        "shape smaller than its bytes": (_with_entry(lambda e: e.update(shape=[5, 5])), "offset|shape|size"),
        "huge shape": (_with_entry(lambda e: e.update(shape=[2**40, 2**40])), "overflow|shape|size"),
        "huge shape overflowing u64": (_with_entry(lambda e: e.update(shape=[2**62, 2**62, 1])), "overflow|shape|size"),
        "offsets past the data": (
            _with_offsets({"ids": [b_offsets[1], b_offsets[1] + 24 + 64]}),
            "offset|incomplete|cover",
        ),
        "offsets overlapping": (_with_offsets({"b": [w_offsets[1] - 8, w_offsets[1] + 16]}), "offset|incomplete|cover"),
        "offsets leaving a gap": (
            _with_offsets({"b": [w_offsets[1] + 8, b_offsets[1] + 8], "ids": [b_offsets[1] + 8, size + 8]}, size + 8),
            "offset|incomplete|cover",
        ),
        "offsets reversed": (_with_offsets({"w": [w_offsets[1], w_offsets[0]]}), "offset"),
        "data longer than declared": (valid + bytes(16), "incomplete|cover|offset"),
        "duplicate names": (
            _raw_header(
                '{"w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]}, '
                '"w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [120, 240]}}',
                240,
            ),
            "offset|incomplete|cover|duplicate",
        ),
    }
    return files


def truncations(data: bytes) -> list[int]:
    """Cut points of a valid file: inside the length, inside the header, inside the data."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    points = set(range(0, 9))  # every cut of the 8-byte length, and exactly after it
    points |= {9, 8 + (header_end - 8) // 2, header_end - 1, header_end}  # in the header, and header only
    points |= {header_end + 1, (header_end + len(data)) // 2, len(data) - 1}  # in the data
    return sorted(p for p in points if p < len(data))


def odd_files() -> dict[str, bytes]:
    """Files that look unusual but the official loader accepts and reads."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5)).astype("<f4").tobytes()
    return {
        "zero tensors": encode({}),
        "zero tensors, unpadded header": encode({}, pad=False),
        "only metadata": encode({"__metadata__": {"format": "pt", "note": "no weights"}}),
        "metadata null": encode(b'{"__metadata__": null}'),
        "zero-size tensors": build({"empty": ("F32", [0, 5]), "none": ("F16", [4, 0]), "flat": ("I8", [0])}),
        "zero-size tensor with a huge dimension": build({"ghost": ("F32", [2**40, 0]), "w": ("F32", [3, 2])}),
        "a scalar": build({"scale": ("F32", []), "w": ("F32", [4, 3])}),
        "a float64 scalar only": build({"t": ("F64", [])}),
        "unicode names": build({"é.wëight": ("F32", [4, 3]), "层.权重": ("F16", [3, 4]), "😀": ("F32", [2, 2])}),
        "names with brackets and spaces": build(
            {"experts[0].w": ("F32", [4, 3]), "a b.weight": ("F32", [3, 3]), "[/bold]": ("F32", [2, 3])}
        ),
        "name with a NUL": encode(
            b'{"a\\u0000b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}', bytes(16)
        ),
        "escaped name": encode(b'{"\\u0077": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]}}', w),
        "extra fields in an entry": encode(
            {"w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120], "note": [1, {"x": None}]}}, w
        ),
        "header with leading whitespace": encode(
            b' \n{"w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]}}', w
        ),
        "same entry twice": encode(
            b'{"w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]},'
            b' "w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]}}',
            w,
        ),
        "tensors out of offset order": encode(
            {
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [120, 128]},
                "w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]},
            },
            w + bytes(8),
        ),
        "every integer and bool dtype": build(
            {code: (code, [2, 3]) for code in ("I64", "I32", "I16", "I8", "U8", "BOOL")}
        ),
        "unsigned dtypes": build({"u16": ("U16", [2, 3]), "u32": ("U32", [3, 2]), "u64": ("U64", [2, 2])}),
        "every float dtype": build(
            {code: (code, [4, 3]) for code in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")}
        ),
        "complex64": build({"c": ("C64", [3, 2]), "w": ("F32", [4, 3])}),
        "float8 e8m0": build({"scales": ("F8_E8M0", [4, 2]), "w": ("F32", [4, 3])}),
        "float4": encode({"f4": {"dtype": "F4", "shape": [4, 2], "data_offsets": [0, 4]}}, bytes(4)),
        # the official loader reads a struct from a JSON array of its fields, in order
        "entry written as an array": encode(b'{"w": ["F32", [6, 5], [0, 120]]}', w),
    }


def entries(data: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) of a file the official loader accepts, read by hand."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = info if isinstance(info, list) else (info[k] for k in FIELDS)
        out[name] = (dtype, tuple(shape), data[base + start : base + end])
    return out


# --- hypothesis: files valid or damaged by one mutation --------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
    lambda name: name != "__metadata__"
)
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def specs(draw) -> tuple[dict[str, tuple[str, list[int]]], dict | None]:
    tensors = draw(st.dictionaries(names, st.tuples(st.sampled_from(sorted(ITEM_SIZE)), shapes), max_size=4))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2))
    if metadata is not None:
        metadata.pop("lowrank", None)  # a lowrank key makes a lowrank file, another test's subject
    return {name: (dtype, list(shape)) for name, (dtype, shape) in tensors.items()}, metadata


@st.composite
def files(draw) -> tuple[str, bytes]:
    """(what was done, the file's bytes): a valid file, or one damaged by one mutation."""
    tensors, metadata = draw(specs())
    valid = build(tensors, metadata, seed=draw(st.integers(0, 2**16)))
    header, size = layout(tensors, metadata)
    data = valid[8 + int.from_bytes(valid[:8], "little") :]
    mutation = draw(
        st.sampled_from(
            [
                "valid",
                "truncate",
                "length",
                "flip byte",
                "append",
                "entry field",
                "offsets",
                "shape",
                "dtype",
                "duplicate",
                "raw header",
                "entry as array",
            ]
        )
    )
    named = [name for name in header if name != "__metadata__"]
    if mutation == "truncate":
        cut = draw(st.integers(0, max(0, len(valid) - 1)))
        return f"truncated at {cut}", valid[:cut]
    if mutation == "length":
        length = draw(st.sampled_from([0, 1, 7, 2**63, 2**64 - 1, 100_000_001]) | st.integers(0, len(valid) + 64))
        return f"length {length}", struct.pack("<Q", length) + valid[8:]
    if mutation == "flip byte":
        at = draw(st.integers(0, len(valid) - 1))
        value = draw(st.integers(0, 255))
        return f"byte {at} set to {value}", valid[:at] + bytes([value]) + valid[at + 1 :]
    if mutation == "append":
        return "bytes appended", valid + draw(st.binary(min_size=1, max_size=16))
    if mutation == "raw header":
        text = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
        return f"header {text!r}", encode(text, data)
    if not named:
        return "valid, no tensors", valid
    name = draw(st.sampled_from(named))
    entry = header[name]
    if mutation == "entry field":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if draw(st.booleans()):
            del entry[field]
            return f"'{name}' without {field}", encode(header, data)
        entry[field] = draw(json_values)
        return f"'{name}' {field} = {entry[field]!r}", encode(header, data)
    if mutation == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = [start + draw(st.integers(-9, 9)), end + draw(st.integers(-9, 9))]
        return f"'{name}' offsets {entry['data_offsets']}", encode(header, data)
    if mutation == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 2**41), max_size=3))
        return f"'{name}' shape {entry['shape']}", encode(header, data)
    if mutation == "dtype":
        entry["dtype"] = draw(st.sampled_from(sorted(ITEM_SIZE) + UNKNOWN_DTYPES))
        return f"'{name}' dtype {entry['dtype']}", encode(header, data)
    if mutation == "entry as array":  # the same fields as a JSON array, in a drawn order
        order = draw(st.permutations(FIELDS))
        header[name] = [entry[field] for field in order]
        return f"'{name}' as an array of {order}", encode(header, data)
    if mutation == "duplicate":
        text = json.dumps(header, ensure_ascii=False)
        twin = json.dumps({name: entry}, ensure_ascii=False)[1:-1]
        return f"'{name}' twice", encode((text[:-1] + ", " + twin + "}").encode("utf-8"), data)
    return "valid", valid
