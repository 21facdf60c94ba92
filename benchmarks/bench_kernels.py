"""The kernel choices lowrank's code comments stand on, each timed beside the alternative, on the CPU at hand.

    python benchmarks/bench_kernels.py                 # about a minute on 2 cores
    python benchmarks/bench_kernels.py --quick         # small sizes, one repeat (a smoke run)
    python benchmarks/bench_kernels.py --threads 1

Each row is one choice in lowrank_cli (the place is named), the time of what lowrank does and of
the plainer alternative, best of --repeats, in this one process, and the ratio: > 1 means
lowrank's choice is the faster here. Choices made by a rule of the hardware (the bfloat16 sketch)
print the rule's answer on this machine beside the times. The second table is the exact SVD
against lowrank's randomized one at the sizes around linalg.factorize's _CHEAP_EXACT line, with
each exact SVD's cost per m·n·min(m, n). Matrices are float32 with σ_i = i^-0.5.

The rows for lowrank_cli.nn (running factors) use a 1536×576 matrix factored at rank 196, 60 % of
its params (SmolLM2-135M's MLP shape), and a 2048×737 factor (TinyLlama-1.1B's down_proj B at 60 %),
random values; each time is a batch of calls. The third
table times that matrix W against its factors run as LowRankLinear runs them, (x·Aᵀ)·Bᵀ with B in
load_pretrained's memory order (lay_out_factors), at ranks that keep 50 % to 90 % of W's params, in float32
and bfloat16, for 1, 8 and 512 rows of x: the
ground of SPEED_SHARE, past which compress notes that factors save memory but hardly time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import cpu_line, row, spectrum, timed, timing_arguments  # noqa: E402  (this folder is on sys.path when run as a script)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowrank_cli.linalg.factorize import exact_is_cheap, finite  # noqa: E402
from lowrank_cli.linalg.randomized import fast_bfloat16, orthonormal, sum_of_squares  # noqa: E402
from lowrank_cli.linalg.spectrum import SPEED_SHARE, svd  # noqa: E402
from lowrank_cli.model.calibrate import CHUNK  # noqa: E402
from lowrank_cli.nn.linear import ATEN_GEMV_MAX, Kernel, b_by_columns, kernel_for, linear  # noqa: E402


def residual_squares(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> float:
    """‖W − B·A‖² in row blocks of 16 MiB, the residual formed in `dtype` (linalg.factorize.relative_error)."""
    rows = max(1, (16 << 20) // (8 * w.shape[1]))
    a, total = a.to(dtype), 0.0
    for start in range(0, w.shape[0], rows):
        block = torch.addmm(w[start : start + rows].to(dtype), b[start : start + rows].to(dtype), a, alpha=-1)
        total += float(block.square().sum(dtype=torch.float64))  # (rows, r) @ (r, n) -> (rows, n)
    return total


def moment_chunked_float32(x: torch.Tensor) -> torch.Tensor:
    """Σ x xᵀ as model.calibrate sums it: float32 products over CHUNK tokens, each added to a float64 sum."""
    n = x.shape[1]
    total = torch.zeros(n, n, dtype=torch.float64)
    partial = torch.zeros(n, n, dtype=torch.float32)
    for start in range(0, x.shape[0], CHUNK):
        chunk = x[start : start + CHUNK]
        partial.zero_().addmm_(chunk.T, chunk)  # (n, t) @ (t, n) -> (n, n)
        total += partial
    return total


def moment_float64(x: torch.Tensor) -> torch.Tensor:
    x64 = x.to(torch.float64)
    return x64.T @ x64  # (n, t) @ (t, n) -> (n, n)


def svd_wide_by_qr(b: torch.Tensor):
    """linalg.randomized's SVD of a wide k×n matrix: QR of bᵀ, then the SVD of the k×k factor."""
    q, r = torch.linalg.qr(b.T)  # (n, k), (k, k)
    u, s, vh_r = torch.linalg.svd(r.T)
    return u, s, vh_r @ q.T  # (k, k) @ (k, n) -> (k, n)


def layers(fn, weights: list, passes: int):
    """fn(weights) over every weight in turn, `passes` times: a product of a few µs is timed as a pass
    over a model's layers, each weight read afresh (not from the core's cache) as in a forward."""

    def run():
        for _ in range(passes):
            for weight in weights:
                fn(weight)

    return run


def copies(count: int, *shape: int, generator: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> list:
    return [torch.randn(*shape, generator=generator).to(dtype) for _ in range(count)]


def other_kernel(row: torch.Tensor, weights: list, passes: int) -> tuple:
    """The one-row kernel the rule did not pick for these weights: ATen's gemv or oneDNN's W·x (torch.mv)."""
    if kernel_for(row, weights[0]) is Kernel.onednn_mv:
        return "ATen's gemv", layers(lambda w: on_aten(F.linear, row, w), weights, passes)
    return "oneDNN's W·x (torch.mv)", layers(lambda w: torch.mv(w, row[0]), weights, passes)


def laid_out(b: torch.Tensor) -> torch.Tensor:
    """B in the memory order lowrank_cli.nn.lay_out_factors gives it (by columns where b_by_columns says)."""
    return b.t().contiguous().t() if b_by_columns(b) else b


def on_aten(function, *args):
    """function(*args) with oneDNN off: the product on ATen's own kernel."""
    torch._C._set_mkldnn_enabled(False)
    try:
        return function(*args)
    finally:
        torch._C._set_mkldnn_enabled(True)


def factor_shares(m: int, n: int, repeats: int, count: int) -> None:
    """x·Wᵀ against lowrank's (x·Aᵀ)·Bᵀ at ranks that keep 50–90 % of W's params, in both dtypes."""
    shares = (0.5, 0.6, 0.7, SPEED_SHARE, 0.9)
    print(f"\nfactors B·A of a {m}×{n} W against W itself (nn.linear.linear, SPEED_SHARE = {SPEED_SHARE}), each"
          f" over {count} copies as a model's layers: W's time / the factors' time, > 1 where the factors are"
          " faster\n")  # fmt: skip
    print(row("dtype", "rows of x", "W ms", *(f"factors at {share:.0%}" for share in shares)))
    print(row(*["---"] * (3 + len(shares))))
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        ws = copies(count, m, n, generator=g, dtype=dtype)
        factors = []
        for share in shares:
            rank = int(share * m * n) // (m + n)
            bs, as_ = copies(count, m, rank, generator=g, dtype=dtype), copies(count, rank, n, generator=g, dtype=dtype)
            bs = [laid_out(b) for b in bs]  # as load_pretrained stores them (lay_out_factors)
            pairs = zip(bs, as_, strict=True)
            factors.append(list(pairs))
        for rows in (1, 8, 512):
            x = torch.randn(rows, n, generator=g).to(dtype)
            dense = layers(lambda w, x=x: F.linear(x, w), ws, 1)
            dense()
            t_dense, _ = timed(dense, repeats)
            ratios = []
            for pairs in factors:
                # (rows, n) -> (rows, r) -> (rows, m), as LowRankLinear.forward
                run = layers(lambda pair, x=x: linear(linear(x, pair[1]), pair[0]), pairs, 1)
                run()
                ratios.append(f"{t_dense / timed(run, repeats)[0]:.2f}")
            per_w = f"{t_dense / count * 1e3:.3f}"
            print(row(str(dtype).removeprefix("torch."), rows, per_w, *ratios), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="n of the n×n matrices of the first table")
    args = timing_arguments(parser, quick="n = 256, one repeat, small SVD sizes")
    n, repeats = (256, 1) if args.quick else (args.size, args.repeats)
    print(f"CPU: {cpu_line()}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}; best of {repeats}; float32, n = {n}\n", flush=True)

    w = spectrum(n)
    k = 80  # a rank-64 sketch with lowrank's oversampling of 16
    g = torch.Generator().manual_seed(1)
    omega = torch.randn(n, k, generator=g)
    b, a = torch.randn(n, 64, generator=g), torch.randn(64, n, generator=g)
    x = torch.randn(8 * n, n // 4, generator=g)  # tokens × features of a layer input
    wide = torch.randn(n // 8, n, generator=g)
    w16 = w.to(torch.bfloat16)
    bfloat16_rule = f"bfloat16 sketch here: {'yes' if fast_bfloat16('cpu') else 'no'} (fast_bfloat16)"
    # A factored 1536×576 at 60 % of its params (SmolLM2-135M's MLP shape): A (196, 576), B (1536, 196),
    # one per layer of its 30; and a factor of TinyLlama-1.1B's MLP at 60 %, B (2048, 737), one per layer of 22
    (m, cols, rank), big_shape = ((192, 72, 24), (192, 96)) if args.quick else ((1536, 576, 196), (2048, 737))
    count, big_count, passes = (2, 2, 1) if args.quick else (30, 22, 10)
    a16s, b16s = copies(count, rank, cols, generator=g), copies(count, m, rank, generator=g)
    bigs = copies(big_count, *big_shape, generator=g)
    row16 = torch.randn(1, cols, generator=g).to(torch.bfloat16)
    h16 = torch.randn(1, rank, generator=g).to(torch.bfloat16)
    big_row = torch.randn(1, big_shape[1], generator=g).to(torch.bfloat16)
    side = ">" if bigs[0].numel() > ATEN_GEMV_MAX else "≤"
    big_what = f"x·Wᵀ, W {big_shape[0]}×{big_shape[1]} {side} {ATEN_GEMV_MAX:,} elements, one bfloat16 row"

    def rule(x: torch.Tensor, weight: torch.Tensor) -> str:
        return f"nn.linear.kernel_for; here: {kernel_for(x, weight).value}"

    stacked = [torch.cat([a, a.clone()]) for a in a16s]  # gate/up pairs stacked (nn.siblings)
    b32s = [b.float() for b in b16s]
    b32_columns = [laid_out(b) for b in b32s]
    h32 = h16.float()
    order = "by columns" if b_by_columns(b32s[0]) else "by rows"
    rows8 = torch.randn(8, cols, generator=g).to(torch.bfloat16)
    each = f"{passes} passes over {count} layers"

    choices = [
        ("NaN/Inf check", "linalg.factorize.finite", "one aminmax pass", lambda: finite(w),
         "isfinite(W).all()", lambda: bool(torch.isfinite(w).all())),
        ("Σ W²", "linalg.randomized.sum_of_squares", "float32 row dots, float64 sums", lambda: sum_of_squares(w),
         "vector_norm in float64", lambda: float(torch.linalg.vector_norm(w, dtype=torch.float64)) ** 2),
        ("‖W − B·A‖² (r = 64)", "linalg.factorize.relative_error", "residual in float32",
         lambda: residual_squares(w, b, a, torch.float32),
         "residual in float64", lambda: residual_squares(w, b, a, torch.float64)),
        (f"Σ x xᵀ ({x.shape[0]} tokens × {x.shape[1]})", "model.calibrate.Calibrator", f"float32 over {CHUNK} tokens",
         lambda: moment_chunked_float32(x), "float64 products", lambda: moment_float64(x)),
        (f"orthonormal basis of {n}×{k}", "linalg.randomized.orthonormal", "CholeskyQR2",
         lambda: orthonormal(omega), "Householder QR", lambda: torch.linalg.qr(omega).Q),
        (f"SVD of {n // 8}×{n}", "linalg.randomized (_svd_wide)", "QR of bᵀ, then k×k SVD",
         lambda: svd_wide_by_qr(wide), "svd(b)", lambda: torch.linalg.svd(wide, full_matrices=False)),
        (f"W·Ω, {n}×{n} @ {n}×{k}", f"linalg.randomized; {bfloat16_rule}", "float32",
         lambda: w @ omega, "bfloat16", lambda: w16 @ omega.to(torch.bfloat16)),
        (f"Wᵀ·X in bfloat16, {n}×{n}, {k} columns", "linalg.randomized (_times_t)", "(Xᵀ·W)ᵀ, X contiguous",
         lambda: (omega.T.to(torch.bfloat16, memory_format=torch.contiguous_format) @ w16).T,
         "W.T @ X", lambda: w16.T @ omega.to(torch.bfloat16)),
        (f"x·Aᵀ, A {rank}×{cols}, one bfloat16 row, {each}", rule(row16, a16s[0]), "linear",
         layers(lambda a: linear(row16, a), a16s, passes),
         "F.linear (oneDNN's x·Wᵀ)", layers(lambda a: F.linear(row16, a), a16s, passes)),
        (f"h·Bᵀ, B {m}×{rank}, one bfloat16 row, {each}", rule(h16, b16s[0]), "linear",
         layers(lambda b: linear(h16, b), b16s, passes),
         "F.linear (oneDNN's x·Wᵀ)", layers(lambda b: F.linear(h16, b), b16s, passes)),
        (f"{big_what}, {passes} passes over {big_count} layers", rule(big_row, bigs[0]), "linear",
         layers(lambda w: linear(big_row, w), bigs, passes),
         "F.linear (oneDNN's x·Wᵀ)", layers(lambda w: F.linear(big_row, w), bigs, passes)),
        (f"{big_what}, {passes} passes over {big_count} layers", rule(big_row, bigs[0]), "linear",
         layers(lambda w: linear(big_row, w), bigs, passes),
         *other_kernel(big_row, bigs, passes)),
        (f"h·Bᵀ, B {m}×{rank}, one float32 row, {each}", f"nn.linear.b_by_columns; here: {order}",
         "B stored by columns", layers(lambda b: linear(h32, b), b32_columns, passes),
         "B stored by rows", layers(lambda b: linear(h32, b), b32s, passes)),
        (f"two siblings' A·x, 2 × {rank}×{cols}, 8 bfloat16 rows, {each}", "nn.siblings.Siblings",
         "one stacked product", layers(lambda s: linear(rows8, s), stacked, passes),
         "a product each", layers(lambda a: (linear(rows8, a), linear(rows8, a)), a16s, passes)),
    ]  # fmt: skip
    print(row("computation", "where", "lowrank", "ms", "alternative", "ms", "alternative / lowrank"))
    print(row(*["---"] * 7))
    for what, where, ours, fn, theirs, alternative in choices:
        fn(), alternative()  # warm up: first calls allocate and pick kernels
        t_ours, _ = timed(fn, repeats)
        t_theirs, _ = timed(alternative, repeats)
        ratio = f"{t_theirs / t_ours:.2f}"
        print(row(what, where, ours, f"{t_ours * 1e3:.2f}", theirs, f"{t_theirs * 1e3:.2f}", ratio), flush=True)

    shapes = [(64, 64), (96, 192)] if args.quick else [(384, 1536), (512, 512), (640, 640), (768, 768), (512, 2048)]
    print("\nexact SVD (gesdd) against lowrank's randomized rank-64 SVD, around the line exact_is_cheap draws\n")
    print(row("m×n", "m·n·min(m, n)", "exact s", "ns per m·n·min", "randomized s", "auto takes exact"))
    print(row(*["---"] * 6))
    for m, cols in shapes:
        matrix = spectrum(max(m, cols))[:m, :cols].contiguous()
        rank = min(64, min(m, cols) // 4)
        cost = m * cols * min(m, cols)
        t_exact, _ = timed(lambda matrix=matrix: svd(matrix), repeats)
        t_random, _ = timed(lambda matrix=matrix, rank=rank: randomized(matrix, rank), repeats)
        cheap = "yes" if exact_is_cheap(m, cols) else "no"
        per = f"{t_exact / cost * 1e9:.2f}"
        print(row(f"{m}×{cols}", f"{cost:.1e}", f"{t_exact:.3f}", per, f"{t_random:.3f}", cheap), flush=True)

    factor_shares(*((96, 64) if args.quick else (1536, 576)), repeats, 2 if args.quick else 30)


def randomized(matrix: torch.Tensor, rank: int):
    from lowrank_cli.linalg.factorize import truncated_svd
    from lowrank_cli.linalg.policy import RankPolicy

    return truncated_svd(matrix, RankPolicy(rank=rank), method="randomized")


if __name__ == "__main__":
    main()
