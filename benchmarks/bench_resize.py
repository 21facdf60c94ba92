"""lowrank resize against kohya's method (a full SVD of each product B·A) on one kohya LoRA file.

    python benchmarks/bench_resize.py                 # 100 modules of 4096×4096 at rank 128 → --rank 16
    python benchmarks/bench_resize.py --quick         # 4 modules of 512×512, rank 32 → 8 (a smoke run)

The adapter: --modules pairs up (m, r) and down (r, m), float32, alpha = r/2 (scale 0.5), up's
columns falling by two decades so the product has a spectrum to cut. lowrank is called through its
public API on the whole file (lowrank_cli.resize, --rank), so its time includes reading every
pair, the QRs and r×r SVDs, measuring each error on the factors as written, and writing the file.

kohya's method is sd-scripts' networks/resize_lora.py: merged = up @ down, then
torch.linalg.svd(merged) (full_matrices, as there), then U[:, :r′]·S[:r′] and Vh[:r′]. A full
SVD of 4096×4096 takes tens of seconds on a small CPU, so it runs on --sample modules only, timed
as plain torch calls (no file reading or writing, which favours it), and the table gives its time
per module beside lowrank's per module over all of them. Both run in this one process, one after
the other: on a shared machine the ratio is the figure to read, not the seconds.

On the sampled modules, each error ‖scale·B·A − B′·A′‖_F / ‖scale·B·A‖_F is measured densely in
float64 on the file lowrank wrote, and compared with the optimal truncation of the product,
√(Σ_{i>r′} σ_i² / Σ σ_i²) from kohya's SVD.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_calibration import cpu_name  # noqa: E402  (one CPU line for every benchmark; puts the repo on sys.path)

import lowrank_cli  # noqa: E402


def lora_file(path: Path, modules: int, size: int, rank: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """A kohya LoRA of `modules` pairs at `rank`, alpha = rank/2; returns {prefix: (up, down, scale)}."""
    generator = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    decay = torch.logspace(0, -2, rank)
    for index in range(modules):
        prefix = f"lora_unet_blocks_{index}_attn_to_q"
        up = torch.randn(size, rank, generator=generator) * decay / size**0.5  # (m, r)
        down = torch.randn(rank, size, generator=generator) / size**0.5  # (r, n)
        tensors[f"{prefix}.lora_up.weight"], tensors[f"{prefix}.lora_down.weight"] = up, down
        tensors[f"{prefix}.alpha"] = torch.tensor(rank / 2)
        pairs[prefix] = (up, down, 0.5)
    save_file(tensors, str(path))
    return pairs


def kohya_resize(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sd-scripts' resize_lora.py for one linear pair: the product, its full SVD, the first `rank` terms."""
    merged = up @ down  # (m, r) @ (r, n) -> (m, n)
    u, s, vh = torch.linalg.svd(merged)
    return u[:, :rank] * s[:rank], vh[:rank], s  # (m, r′), (r′, n), all σ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=100)
    parser.add_argument("--size", type=int, default=4096, help="each module is SIZE×SIZE")
    parser.add_argument("--rank-in", type=int, default=128, help="the adapter's rank")
    parser.add_argument("--rank", type=int, default=16, help="the rank to resize to")
    parser.add_argument("--sample", type=int, default=3, help="modules kohya's method runs on")
    parser.add_argument("--quick", action="store_true", help="4 modules of 512×512, rank 32 → 8, 2 sampled")
    args = parser.parse_args()
    if args.quick:
        args.modules, args.size, args.rank_in, args.rank, args.sample = 4, 512, 32, 8, 2

    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"adapter: {args.modules} modules of {args.size}×{args.size} at rank {args.rank_in} (float32, kohya),"
          f" resized to --rank {args.rank}; kohya's method on {args.sample} of them\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / "lora.safetensors", Path(folder) / "resized.safetensors"
        pairs = lora_file(source, args.modules, args.size, args.rank_in)
        start = time.perf_counter()
        report = lowrank_cli.resize(source, out, rank=args.rank, device="cpu")
        ours = time.perf_counter() - start
        written = load_file(str(out))

        sampled = list(pairs)[:: max(1, args.modules // args.sample)][: args.sample]
        kohya_seconds, rows = 0.0, []
        for prefix in sampled:
            up, down, scale = pairs[prefix]
            start = time.perf_counter()
            _, _, s = kohya_resize(up, down, args.rank)
            kohya_seconds += time.perf_counter() - start
            optimal = float((s[args.rank :].double() ** 2).sum().sqrt() / (s.double() ** 2).sum().sqrt())
            product = scale * (up.double() @ down.double())  # (m, n), float64: the reference
            b, a = written[f"{prefix}.lora_up.weight"].double(), written[f"{prefix}.lora_down.weight"].double()
            alpha = float(written[f"{prefix}.alpha"])
            error = torch.linalg.matrix_norm(product - alpha / args.rank * (b @ a))  # (m, r′) @ (r′, n)
            measured = float(error / torch.linalg.matrix_norm(product))
            rows.append((prefix, optimal, measured, next(t.rel_error for t in report.tensors if t.name == prefix)))

    per_kohya, per_ours = kohya_seconds / len(sampled), ours / args.modules
    print("| method | modules timed | seconds | per module | kohya / this, per module |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| kohya (full SVD of B·A, torch) | {len(sampled)} of {args.modules} | {kohya_seconds:.2f} |"
          f" {per_kohya:.3f} s | 1× |")  # fmt: skip
    print(f"| lowrank_cli.resize (whole file) | {args.modules} of {args.modules} | {ours:.2f} | {per_ours:.4f} s |"
          f" {per_kohya / per_ours:.1f}× |")  # fmt: skip
    estimate = per_kohya * args.modules
    print(f"\nkohya's method on all {args.modules} modules: about {estimate:.1f} s (per module × count).\n")
    print("| module | optimal truncation | lowrank, measured on the file | lowrank's report | |measured − optimal| |")
    print("| --- | --- | --- | --- | --- |")
    for prefix, optimal, measured, reported in rows:
        print(f"| {prefix} | {optimal:.6f} | {measured:.6f} | {reported:.6f} | {abs(measured - optimal):.1e} |")
    worst = max(abs(measured - optimal) for _, optimal, measured, _ in rows)
    print(f"\nlargest |measured − optimal| on the sampled modules: {worst:.1e} ({'≤' if worst <= 1e-5 else '>'} 1e-5)")


if __name__ == "__main__":
    main()
