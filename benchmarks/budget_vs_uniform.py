"""--budget against one uniform rank at the same total size, on sample_weights/demo.safetensors.

    python benchmarks/budget_vs_uniform.py [CHECKPOINT]

For each budget F the uniform rank is the largest R whose factors hold no more params than
the budget's allocation does; errors are the exact (Eckart–Young) ones from each spectrum.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lowrank_cli


def summary(report) -> tuple[int, float, float, float]:
    # Every analyzed matrix: factorized, or dense (kept whole by the budget or above break-even), at error 0.
    matrices = [t for t in report.tensors if t.status.value in ("factorized", "dense")]
    params = sum(t.params_after for t in matrices)
    squared = [t.rel_error**2 for t in matrices]
    return params, sum(squared), (sum(squared) / len(squared)) ** 0.5, max(t.rel_error for t in matrices)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "sample_weights" / "demo.safetensors"
    print(f"{path.name}: Σ over matrices of relative squared error, budget allocation vs uniform rank\n")
    budget_columns = "| budget F | params after | Σ err² | rms err | max err "
    print(budget_columns + "| uniform R | params after | Σ err² | rms err | max err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fraction in (0.1, 0.2, 0.3, 0.4):
        budget = summary(lowrank_cli.analyze(path, budget=fraction, device="cpu"))
        uniform = None
        for rank in range(1, 512):
            candidate = summary(lowrank_cli.analyze(path, rank=rank, device="cpu"))
            if candidate[0] > budget[0]:
                break
            uniform = (rank, candidate)
        rank, u = uniform
        print(
            f"| {fraction:g} | {budget[0]:,} | {budget[1]:.4f} | {budget[2]:.4f} | {budget[3]:.4f} "
            f"| {rank} | {u[0]:,} | {u[1]:.4f} | {u[2]:.4f} | {u[3]:.4f} |"
        )


if __name__ == "__main__":
    main()
