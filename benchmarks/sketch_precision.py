"""What the bfloat16 sketch buys here, and whether it ever moves the rank a target gets.

    python benchmarks/sketch_precision.py                                  # about 1 minute
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/sketch_precision.py --products

1. One product of the size the sketch does (11008×4096 @ 4096×512), float32 against bfloat16,
   under whatever oneDNN may use on this CPU (cap it with ONEDNN_MAX_CPU_ISA to see other CPUs).
2. The adaptive range finder with a bfloat16 and a float32 sketch on four spectra (2048×1536),
   for allowances from 0.1 down to 1e-4 of ‖W‖²: the rank each chooses and its time. lowrank
   uses bfloat16 only for allowances ≥ 1e-3 (factorize._BFLOAT16_SKETCH_ALLOWANCE).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowrank_cli.linalg.factorize import ADAPTIVE_POWER_ITERS, REFINEMENTS, smallest_rank_within  # noqa: E402
from lowrank_cli.linalg.randomized import adaptive_range, fast_bfloat16, sum_of_squares  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    fn()  # oneDNN builds its kernel for a shape on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def products(divide: int) -> None:
    g = torch.Generator().manual_seed(0)
    m, n, k = 11008 // divide, 4096 // divide, 512 // divide
    w = torch.randn(m, n, generator=g)
    x = torch.randn(n, k, generator=g)
    w16, x16 = w.bfloat16(), x.bfloat16()
    t32, t16 = best_of(lambda: w @ x), best_of(lambda: w16 @ x16)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "not set")
    print(f"ONEDNN_MAX_CPU_ISA {cap}; lowrank's fast_bfloat16: {fast_bfloat16('cpu')}")
    print(f"{m}×{n} @ {n}×{k}: float32 {t32:.3f} s, bfloat16 {t16:.3f} s, bfloat16 is {t32 / t16:.2f}× float32")


def spectra(m: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(m, n, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    i = torch.arange(1, n + 1, dtype=torch.float32)
    k = n // 3
    noisy = (u[:, :k] * i[:k] ** -0.5) @ v[:, :k].T + torch.randn(m, n, generator=g) * (0.05 / m**0.5)
    return {
        "i^-0.5 + noise": noisy,
        "i^-1": (u * i**-1.0) @ v.T,  # (m, n) * (n,) @ (n, n) -> (m, n)
        "0.995^i": (u * 0.995**i) @ v.T,
        "i^-2": (u * i**-2.0) @ v.T,
    }


def ranks(divide: int) -> None:
    m, n = 2048 // divide, 1536 // divide
    print(f"\n| spectrum | allowed / ‖W‖² | optimal rank | bf16 rank | f32 rank | bf16 s | f32 s |\n|{' --- |' * 7}")
    for name, w in spectra(m, n).items():
        s2 = torch.linalg.svdvals(w.double()) ** 2
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]
        total = sum_of_squares(w)
        for fraction in (0.1, 1e-2, 3e-3, 1e-3, 5e-4, 1e-4):
            optimal = next(r for r, t in enumerate(tail) if t <= fraction * float(s2.sum()))
            cells = []
            for sketch in (torch.bfloat16, None):
                start = time.perf_counter()
                found = adaptive_range(
                    w,
                    fraction * total,
                    block=max(32, n // 32),
                    power_iters=ADAPTIVE_POWER_ITERS,
                    max_rank=n // 2,
                    generator=torch.Generator().manual_seed(1),
                    refinements=REFINEMENTS,
                    total=total,
                    sketch=sketch,
                )
                elapsed = time.perf_counter() - start
                if found is None:
                    cells.append(("> n/2", elapsed))
                    continue
                (_, sv, _), residual = found
                cells.append((smallest_rank_within(sv, residual, fraction * total), elapsed))
            (r16, t16), (r32, t32) = cells
            print(f"| {name} | {fraction:g} | {optimal} | {r16} | {r32} | {t16:.2f} | {t32:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", action="store_true", help="only the product timing (part 1)")
    parser.add_argument("--divide", type=int, default=1, help="divide every dimension by this (a smoke run: 8)")
    args = parser.parse_args()
    products(args.divide)
    if not args.products:
        ranks(args.divide)


if __name__ == "__main__":
    main()
