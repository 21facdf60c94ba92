"""lowrank against torch.linalg.svd on one n×n float32 safetensors file, on the CPU at hand.

    python benchmarks/bench_cpu.py                      # 4096×4096, about 2 minutes on 2 cores
    python benchmarks/bench_cpu.py --size 1024 --repeats 1
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python benchmarks/bench_cpu.py --threads 2      # as far as software can, a CPU with AVX2 only

The matrix has σ_i = i^-0.5 (i = 1..n) between random orthonormal bases, stored as F32. lowrank is
called through its public API on the whole file, so its times include reading the tensor, measuring
the error of its factors and writing the output, but not Python's or torch's start-up. The
baselines run in the same process: torch.linalg.svd (then truncate, what most tools do), svdvals,
and the float64 Gram route (√eigvalsh(WᵀW)), timed as plain torch calls. σ₆₄ is svdvals of W in
float64, the reference for every route's accuracy. lowrank's times are the best of --repeats runs;
each baseline runs once (they take seconds, and a shared machine moves them by ±30 % anyway).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank_cli  # noqa: E402

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
NAME = "layer.weight"


def cpu_line() -> str:
    """CPU model, its vector ISA, the caps set on it and torch's thread count."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        model, flags = platform.processor() or platform.machine(), set()
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(ISA_FLAGS)
    caps = ", ".join(f"{c}={os.environ[c]}" for c in ISA_CAPS if c in os.environ) or "no ISA caps"
    return (
        f"{model}; ISA: {isa}; {caps}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels),"
        f" {torch.get_num_threads()} threads"
    )


def timing_arguments(parser: argparse.ArgumentParser, quick: str) -> argparse.Namespace:
    """The parser's options with --repeats, --threads and --quick (help: `quick`), parsed; torch's threads set."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help=quick)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def spectrum(n: int, seed: int = 0) -> torch.Tensor:
    """U·diag(i^-0.5)·Vᵀ in float32, U and V random orthonormal."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    sigma = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
    return ((u * sigma) @ v.T).contiguous()  # (n, n) @ (n, n) -> (n, n)


def timed(fn, repeats: int = 1):
    """The best time of `repeats` calls, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def gram_values(w: torch.Tensor) -> torch.Tensor:
    w64 = w.double()
    return torch.linalg.eigvalsh(w64.T @ w64).flip(0).clamp_min(0).sqrt()  # (n, n) @ (n, n) -> (n, n)


def plain_read(path: Path, nbytes: int, offset: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(nbytes)


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--max-error", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.size
    print(f"CPU: {cpu_line()}")
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.1f} (a shared machine's other work slows every row, not equally)")
    from lowrank_cli.linalg.spectrum import cpu_vendor, spectrum_route  # reported only: analyze's route here

    print(f"analyze's spectrum route here: {spectrum_route(torch.zeros(n, n))} (by rule; vendor_id {cpu_vendor()})")
    print(f"float32 {n}×{n}, σ_i = i^-0.5; lowrank: best of {args.repeats}; baselines: one run each\n", flush=True)

    w = spectrum(n)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        save_file({NAME: w}, str(path))
        header = int.from_bytes(path.read_bytes()[:8], "little")
        t_svd, _ = timed(lambda: torch.linalg.svd(w, full_matrices=False))
        t_vals, s32 = timed(lambda: torch.linalg.svdvals(w))
        t_gram, gram = timed(lambda: gram_values(w))
        s64 = torch.linalg.svdvals(w.double())
        top = float(s64[0])
        squares = (s64**2).numpy()
        tail = np.append(np.cumsum(squares[::-1])[::-1], 0.0) / squares.sum()  # tail[r] = optimal error²

        t_plain, _ = timed(lambda: plain_read(path, 4 * n * n, 8 + header), args.repeats)
        from lowrank_cli.io.checkpoint import open_checkpoint  # the read compress and analyze use

        with open_checkpoint(path) as checkpoint:
            t_read, _ = timed(lambda: checkpoint.read_matrix(NAME, torch.float32), args.repeats)

        out = Path(folder) / "out.safetensors"
        t_rank, rank_report = timed(lambda: lowrank_cli.compress(path, out, rank=args.rank, force=True), args.repeats)
        t_target, target_report = timed(
            lambda: lowrank_cli.compress(path, out, max_error=args.max_error, force=True), args.repeats
        )
        t_analyze, _ = timed(lambda: lowrank_cli.analyze(path), args.repeats)
    print(f"load average at end: {os.getloadavg()[0]:.1f}\n")

    ranked = rank_report.tensors[0]
    target = target_report.tensors[0]
    optimal_rank = int(np.argmax(tail <= args.max_error**2 * (1 + 1e-9)))
    print(row("what", "seconds", "× faster than svd", "quality", "target", "met"))
    print(row(*["---"] * 6))
    print(row("torch.linalg.svd (baseline)", f"{t_svd:.2f}", "1.0", "—", "—", "—"))
    print(
        row(
            "torch.linalg.svdvals (float32)",
            f"{t_vals:.2f}",
            f"{t_svd / t_vals:.1f}",
            f"max Δσ {float((s32.double() - s64).abs().max()) / top:.1e}·σmax",
            "Δσ ≤ 1e-6·σmax",
            "yes" if float((s32.double() - s64).abs().max()) <= 1e-6 * top else "no",
        )
    )
    gram_error = float((gram - s64).abs().max()) / top
    print(
        row(
            "Gram WᵀW float64 + eigvalsh",
            f"{t_gram:.2f}",
            f"{t_svd / t_gram:.1f}",
            f"max Δσ {gram_error:.1e}·σmax",
            "Δσ ≤ 1e-6·σmax",
            "yes" if gram_error <= 1e-6 else "no",
        )
    )
    print(row("plain read of the tensor's bytes", f"{t_plain:.4f}", "—", "—", "—", "—"))
    print(
        row(
            "Checkpoint.read_matrix (to float32, in place)",
            f"{t_read:.4f}",
            "—",
            f"{t_read / t_plain:.2f}× a plain read",
            "≈ one pass",
            "yes" if t_read <= 1.5 * t_plain else "no",
        )
    )
    error_ratio = ranked.rel_error / float(np.sqrt(tail[args.rank]))
    print(
        row(
            f"lowrank_cli.compress rank={args.rank}",
            f"{t_rank:.2f}",
            f"{t_svd / t_rank:.1f}",
            f"error {error_ratio:.4f}× optimal",
            "≥ 30×, ≤ 1.01×",
            "yes" if t_svd / t_rank >= 30 and error_ratio <= 1.01 else "no",
        )
    )
    rank_ratio = target.rank / optimal_rank
    bound = target.rel_error <= args.max_error
    print(
        row(
            f"lowrank_cli.compress max_error={args.max_error}",
            f"{t_target:.2f}",
            f"{t_svd / t_target:.1f}",
            f"rank {target.rank}/{optimal_rank} = {rank_ratio:.3f}, error {target.rel_error:.4f}",
            "≥ 5×, bound, rank ≤ 1.05×",
            "yes" if t_svd / t_target >= 5 and bound and rank_ratio <= 1.05 else "no",
        )
    )
    print(
        row(
            "lowrank_cli.analyze",
            f"{t_analyze:.2f}",
            f"{t_svd / t_analyze:.1f}",
            f"{t_vals / t_analyze:.2f}× svdvals' speed",
            "≥ 2.5×, ≥ svdvals",
            "yes" if t_svd / t_analyze >= 2.5 and t_analyze <= t_vals else "no",
        )
    )


if __name__ == "__main__":
    main()
