"""analyze against torch.linalg.svdvals on the same matrix, and the two spectrum routes, on the CPU at hand.

    python benchmarks/bench_spectrum.py                       # seven shapes up to 4096×4096, ~4 minutes on 2 cores
    python benchmarks/bench_spectrum.py --threads 1
    python benchmarks/bench_spectrum.py --quick                # one 320×320 matrix, a smoke run
    python benchmarks/bench_spectrum.py --shapes 384x384 30522x384   # these shapes only

For each shape, a float32 matrix with σ_i = i^-0.5 between random orthonormal bases, saved as one
safetensors file. In turn, best of --repeats, in one process: `torch.linalg.svdvals(W)` as a user
would call it, each route of lowrank's spectrum on W (svdvals of the tall layout, float64 Gram),
`lowrank_cli.analyze` on the file, which includes reading the tensor and checking it for NaN, and
svdvals of the tall layout on one thread. The ratios divide by svdvals' time: analyze ≤ 1.00 is the
target; "gram / svdvals" is what the route rule in lowrank_cli/linalg/spectrum.py (spectrum_route)
stands on, and "1 thread / svdvals" the thread rule (spectrum_threads: "threads taken", which the
routes and analyze use, so where it is 1 the svdvals-route column is on one thread as well).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_cpu import cpu_line, timing_arguments  # noqa: E402  (this folder is on sys.path when run as a script)

import lowrank_cli  # noqa: E402
from lowrank_cli.linalg.spectrum import cpu_vendor, singular_values, spectrum_route, spectrum_threads  # noqa: E402

SHAPES = [(384, 384), (512, 512), (768, 768), (1024, 1024), (30522, 384), (2048, 2048), (1024, 4096), (4096, 1024)]
SHAPES += [(4096, 4096)]


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


def on_one_thread(w: torch.Tensor) -> None:
    """svdvals of the tall layout (as lowrank's svdvals route) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.linalg.svdvals(w.T if w.shape[0] < w.shape[1] else w)
    finally:
        torch.set_num_threads(threads)


def shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=shape, help="MxN each (default: nine from 384×384 to 4096²)")
    args = timing_arguments(parser, quick="one 320×320 matrix, one round: a smoke run")
    shapes, repeats = ([(320, 320)], 1) if args.quick else (args.shapes or SHAPES, args.repeats)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"CPU: {cpu_line()}; vendor_id {cpu_vendor() or 'unknown'}; OMP_WAIT_POLICY {policy}")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"best of {repeats} in turn; ratios are seconds / svdvals' seconds, same process\n", flush=True)
    columns = ["shape", "svdvals s", "route taken", "threads taken", "gram / svdvals", "svdvals(tall) / svdvals"]
    print(row(*columns, "1 thread / svdvals", "analyze / svdvals"))
    print(row(*["---"] * 8))
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
                    "one thread": lambda w=w: on_one_thread(w),
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
                    spectrum_threads(w) or torch.get_num_threads(),
                    f"{seconds['gram'] / base:.2f}",
                    f"{seconds['tall'] / base:.2f}",
                    f"{seconds['one thread'] / base:.2f}",
                    f"{seconds['analyze'] / base:.2f}",
                ),
                flush=True,
            )
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
