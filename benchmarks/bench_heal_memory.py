"""Peak memory of `lowrank heal` on a 1 B-parameter causal LM, measured in a child process.

    python benchmarks/bench_heal_memory.py [--settings 1x128 4x128 16x128 4x256] [--steps 2] [--work DIR]

No 1 B causal LM ships offline, so the model is built here from TinyLlama-1.1B's config (hidden
2048, 22 layers, MLP 5632, 32 heads, 4 key-value heads, vocabulary 32,000) with RANDOM weights,
saved in bfloat16 as TinyLlama is, beside a byte-level BPE tokenizer trained here on the training
text (licence texts of this machine). Random weights have flat spectra, so the rank is a size, not a
quality: the decoder's matrices are compressed at the one rank that keeps about half their params,

    lowrank compress REF --rank R --method randomized --include 'model.layers.*' -o COMPRESSED

and for each BATCHxSEQ setting a child process runs

    lowrank heal REF COMPRESSED --text FILE -o OUT --steps 2 --batch-size BATCH --seq-len SEQ
        --split windows --device cpu

Its peak RSS is the child's own high-water mark (ru_maxrss from os.wait4; this process never loads
torch, so it adds nothing to it). Two steps, because AdamW's moments exist only from the first
step on. Printed beside: the accounting of docs/heal.md (16 bytes per trainable parameter, the
reference in the dtype heal runs it in, the compressed model's frozen rest in float32, the
interpreter with its libraries) and what is left for one batch's activations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = (  # what heal imports before it loads a model; bench_calibration's CPU line, printed by the child
    f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import torch, transformers, tokenizers,"
    " lowrank_cli.model.heal; from transformers import LlamaForCausalLM; from bench_calibration import cpu_name;"
    " print(cpu_name())"
)
TEXTS = [f"/usr/share/common-licenses/{name}" for name in ("GPL-3", "GPL-2", "Apache-2.0", "LGPL-2.1", "GFDL-1.3")]
TINYLLAMA = dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000)
BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}
GIB = 2**30


def _safetensors_headers(folder: Path) -> dict[str, dict]:
    """Every tensor's header entry (dtype, shape) of a folder's safetensors files, read without torch."""
    entries: dict[str, dict] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        entries.update({name: entry for name, entry in header.items() if name != "__metadata__"})
    return entries


def _numel(entry: dict) -> int:
    count = 1
    for size in entry["shape"]:
        count *= size
    return count


def _count(params: int) -> str:
    return f"{params / 1e9:.3f} B" if params >= 1e8 else f"{params / 1e6:.3f} M"


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def _first_to_go() -> None:
    # on a shared machine the benchmark's child, not a neighbour, is what the kernel ends if memory runs out
    with open("/proc/self/oom_score_adj", "w") as handle:
        handle.write("1000")


def _run(command: list[str]) -> tuple[float, float, str]:
    """(peak RSS in bytes, wall seconds, stdout) of a child process; exits on its failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT, preexec_fn=_first_to_go)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        sys.exit(f"error: {' '.join(command)} exited {child.returncode}:\n{stderr[-3000:]}")
    return usage.ru_maxrss * 1024, wall, stdout  # ru_maxrss is in KiB on Linux


def lowrank(*args: object) -> tuple[float, float, str]:
    return _run([sys.executable, "-m", "lowrank_cli", *map(str, args)])


def build(folder: Path, text: Path, shape: dict, dtype: str) -> None:
    """(child) A Llama-style causal LM of `shape` with random weights, and a BPE tokenizer trained on `text`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]  # Llama's ids 0, 1, 2
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(shape["vocab"], 8000),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(text)], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))  # built in its own dtype: no float32 copy of 1 B params
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def half_rank(shapes: list[list[int]]) -> int:
    """The rank (a multiple of 32) whose factors hold closest to half the matrices' params; a matrix that
    factors would not shrink is kept whole, as compress keeps it."""

    def held(rank: int) -> int:
        return sum(min(rank * (m + n), m * n) for m, n in shapes)

    total = sum(m * n for m, n in shapes)
    return min(range(32, max(max(s) for s in shapes) + 32, 32), key=lambda rank: abs(held(rank) - total / 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["1x128", "4x128", "16x128", "4x256"], help="BATCHxSEQ")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rank", type=int, help="default: about half the decoder matrices' params")
    parser.add_argument("--work", type=Path, help="folder for the models, kept and reused (default: a temporary one)")
    for name, value in TINYLLAMA.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)  # the child that builds the model
    args = parser.parse_args()
    shape = {name: getattr(args, name) for name in TINYLLAMA}
    if args.build_into:
        build(args.build_into, args.build_into.parent / "train.txt", shape, args.dtype)
        return
    texts = [path for path in TEXTS if Path(path).is_file()]
    if not texts:
        sys.exit(f"error: none of {', '.join(TEXTS)} exists; give this machine its licence texts (base-files)")
    import importlib.metadata

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_heal_memory."))
    try:
        reference = work / ("llama-" + "-".join(map(str, shape.values())) + f"-{args.dtype}")
        work.mkdir(parents=True, exist_ok=True)
        text = work / "train.txt"  # the builder reads it beside the reference folder
        text.write_text("\n\n".join(Path(path).read_text(errors="replace") for path in texts))
        libraries, _, cpu = _run([sys.executable, "-c", LIBRARIES])
        print(f"CPU: {cpu.strip()}; torch {importlib.metadata.version('torch')}")
        print(
            f"model: LlamaForCausalLM, hidden {shape['hidden']}, {shape['layers']} layers, MLP {shape['intermediate']},"
            f" {shape['heads']} heads ({shape['kv_heads']} key-value), vocabulary {shape['vocab']:,}; RANDOM weights"
            f" (no 1 B model ships offline), saved in {args.dtype}"
        )
        if (reference / "tokenizer.json").is_file():
            wall = None  # built by an earlier run with this --work: reused
        else:
            _, wall, _ = _run([sys.executable, __file__, "--build-into", str(reference), "--dtype", args.dtype,
                               *(f"--{k.replace('_', '-')}={v}" for k, v in shape.items())])  # fmt: skip
        ref_entries = _safetensors_headers(reference)
        layers = {n: e for n, e in ref_entries.items() if n.startswith("model.layers.")}
        matrices = [e["shape"] for e in layers.values() if len(e["shape"]) == 2]
        rank = args.rank or half_rank(matrices)
        built = "reused from --work" if wall is None else f"built in {wall:.0f} s"
        print(f"{built}; training text: {text.stat().st_size:,} bytes of {', '.join(texts)}")
        compressed = reference.with_name(f"{reference.name}.r{rank}")
        if (compressed / "config.json").is_file():
            wall = None
        else:
            _, wall, _ = lowrank(
                "compress", reference, "--rank", rank, "--method", "randomized", "--include", "model.layers.*",
                "-o", compressed, "--json", "--force",
            )  # fmt: skip
        entries = _safetensors_headers(compressed)
        factors = {n: e for n, e in entries.items() if n.endswith((".A", ".B"))}
        biases = {n[: -len(".weight")] + ".bias" for n in factors if n.endswith(".weight.B")} & set(entries)
        frozen = {n: e for n, e in entries.items() if n not in factors and n not in biases}
        n_ref = sum(map(_numel, ref_entries.values()))
        n_matrices = sum(m * n for m, n in matrices)
        n_factors = sum(map(_numel, factors.values()))
        n_trainable = n_factors + sum(_numel(entries[n]) for n in biases)
        n_frozen = sum(map(_numel, frozen.values()))
        ref_bytes = sum(_numel(e) * BYTES[e["dtype"]] for e in ref_entries.values())
        took = "reused from --work" if wall is None else f"{wall:.0f} s"
        print(f"compress --rank {rank} --method randomized --include 'model.layers.*': {took}")
        print(f"reference: {_count(n_ref)} params, {_folder_bytes(reference) / GIB:.2f} GiB on disk")
        print(
            f"compressed: {_count(n_factors)} params in factors ({n_factors / n_matrices:.1%} of the decoder"
            f" matrices' {_count(n_matrices)}), {_count(n_frozen)} frozen (embeddings, LM head, norms, matrices"
            f" kept whole), {_folder_bytes(compressed) / GIB:.2f} GiB on disk; trainable {_count(n_trainable)}"
        )
        accounted = 16 * n_trainable + ref_bytes + 4 * n_frozen + libraries
        print(
            f"accounting (docs/heal.md): 16 B × trainable {16 * n_trainable / GIB:.2f} GiB + reference as stored"
            f" {ref_bytes / GIB:.2f} GiB + frozen rest in float32 {4 * n_frozen / GIB:.2f} GiB + python, torch and"
            f" transformers {libraries / GIB:.2f} GiB = {accounted / GIB:.2f} GiB before activations"
        )
        print("\n| --batch-size × --seq-len | tokens a step | peak RSS | beyond the accounting | heal wall time |")
        print("| --- | --- | --- | --- | --- |")
        peaks = []
        for setting in args.settings:
            batch, seq = (int(part) for part in setting.split("x"))
            out = work / f"healed-{setting}"
            peak, wall, _ = lowrank(
                "heal", reference, compressed, "--text", text, "-o", out, "--steps", args.steps,
                "--batch-size", batch, "--seq-len", seq, "--split", "windows", "--device", "cpu", "--force",
            )  # fmt: skip
            shutil.rmtree(out)
            peaks.append((seq, batch * seq, peak))
            print(
                f"| {batch} × {seq} | {batch * seq:,} | {peak / GIB:.2f} GiB | {(peak - accounted) / GIB:+.2f} GiB"
                f" | {wall:.0f} s ({args.steps} steps) |",
                flush=True,
            )
        same_seq = sorted((tokens, peak) for seq, tokens, peak in peaks if seq == peaks[0][0])
        if len(same_seq) > 1:  # what one more token of a step costs, at one --seq-len
            (t0, p0), (t1, p1) = same_seq[0], same_seq[-1]
            print(
                f"\nper token of a step at --seq-len {peaks[0][0]} (from {t0:,} to {t1:,} tokens):"
                f" {(p1 - p0) / (t1 - t0) / 2**20:.2f} MiB"
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
