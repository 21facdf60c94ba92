"""analyze against torch.linalg.svdvals on the same matrix, and the two spectrum routes, on the CPU at hand.

    python benchmarks/bench_spectrum.py                       # seven shapes up to 4096×4096, ~4 minutes on 2 cores
    python benchmarks/bench_spectrum.py --threads 1
    python benchmarks/bench_spectrum.py --quick                # one 320×320 matrix, a smoke run

For each shape, a float32 matrix with σ_i = i^-0.5 between random orthonormal bases, saved as one
safetensors file. In turn, best of --repeats, in one process: `torch.linalg.svdvals(W)` as a user
would call it, each route of lowrank's spectrum on W (svdvals of the tall layout, float64 Gram), and
`lowrank_cli.analyze` on the file, which includes reading the tensor and checking it for NaN. The
ratios divide by svdvals' time: analyze ≤ 1.00 is the target, "gram / svdvals" is what the rule in
lowrank_cli/linalg/spectrum.py (spectrum_route) stands on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_cpu import cpu_line, timing_arguments  # noqa: E402  (this folder is on sys.path when run as a script)

import lowrank_cli  # noqa: E402
from lowrank_cli.linalg.spectrum import cpu_vendor, singular_values, spectrum_route  # noqa: E402

SHAPES = [(512, 512), (768, 768), (1024, 1024), (2048, 2048), (1024, 4096), (4096, 1024), (4096, 4096)]


def with_spectrum(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U·diag(i^-0.5)·Vᵀ in float32, U (m, k) and V (n, k) random orthonormal, k = min(m, n)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    return ((u * sigma) @ v.T).contiguous()  # (m, k) @ (k, n) -> (m, n)


def best_in_turn(calls: dict, repeats: int) -> dict[str, float]:
    """Each call's best time over `repeats` rounds, the calls taking turns so that a busy moment
    slows one round of each rather than every run of one."""
    seconds = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = timing_arguments(parser, quick="one 320×320 matrix, one round: a smoke run")
    shapes, repeats = ([(320, 320)], 1) if args.quick else (SHAPES, args.repeats)
    print(f"CPU: {cpu_line()}; vendor_id {cpu_vendor() or 'unknown'}")
    print(f"best of {repeats} in turn; ratios are seconds / svdvals' seconds, same process\n", flush=True)
    print(row("shape", "svdvals s", "route taken", "gram / svdvals", "svdvals(tall) / svdvals", "analyze / svdvals"))
    print(row(*["---"] * 6))
    with tempfile.TemporaryDirectory() as folder:
        warm = with_spectrum(300, 300)  # load every library and import before timing
        save_file({"w": warm}, str(Path(folder) / "warm.safetensors"))
        torch.linalg.svdvals(warm), singular_values(warm, route="gram"), singular_values(warm, route="svdvals")
        lowrank_cli.analyze(Path(folder) / "warm.safetensors")
        for m, n in shapes:
            w = with_spectrum(m, n)
            path = Path(folder) / f"w{m}x{n}.safetensors"
            save_file({"w": w}, str(path))
            seconds = best_in_turn(
                {
                    "svdvals": lambda w=w: torch.linalg.svdvals(w),
                    "gram": lambda w=w: singular_values(w, route="gram"),
                    "tall": lambda w=w: singular_values(w, route="svdvals"),
                    "analyze": lambda path=path: lowrank_cli.analyze(path),
                },
                repeats,
            )
            base = seconds["svdvals"]
            print(
                row(
                    f"{m}×{n}",
                    f"{base:.3f}",
                    spectrum_route(w),
                    f"{seconds['gram'] / base:.2f}",
                    f"{seconds['tall'] / base:.2f}",
                    f"{seconds['analyze'] / base:.2f}",
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
