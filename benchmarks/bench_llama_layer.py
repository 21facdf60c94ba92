"""lowrank against the usual baseline on one LLaMA-7B decoder layer, in one run.

    python benchmarks/bench_llama_layer.py            # the full run (about 10 min on 2 cores)
    python benchmarks/bench_llama_layer.py --quick    # one tensor per shape, no 2 GB RSS run

lowrank runs through its public API (lowrank_cli.factorize, lowrank_cli.analyze, the CLI).
The baseline is what the seed notebook and most tools do: torch.linalg.svd of each tensor, then
truncate. Every figure is a ratio measured in this process (or its children) on this machine.
The checkpoint is synthetic with realistic spectra: slowly decaying singular values
(σ_i ∝ i^-0.5 over a 1024-dimensional signal) plus a Gaussian noise floor, stored in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import lowrank_cli

LAYER = {  # name: (out, in)
    "self_attn.q_proj.weight": (4096, 4096),
    "self_attn.k_proj.weight": (4096, 4096),
    "self_attn.v_proj.weight": (4096, 4096),
    "self_attn.o_proj.weight": (4096, 4096),
    "mlp.gate_proj.weight": (11008, 4096),
    "mlp.up_proj.weight": (11008, 4096),
    "mlp.down_proj.weight": (4096, 11008),
}


def realistic(m: int, n: int, seed: int) -> torch.Tensor:
    """Low rank with a slowly decaying spectrum, plus noise, in bfloat16."""
    g = torch.Generator().manual_seed(seed)
    k = min(1024, min(m, n) // 4)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    noise = torch.randn(m, n, generator=g) * (0.05 / max(m, n) ** 0.5)
    return ((u * sigma) @ v.T + noise).to(torch.bfloat16)  # (m, k) @ (k, n) -> (m, n)


def _gram_values(w: torch.Tensor) -> torch.Tensor:
    """The alternative analyze could use: √eigenvalues of the float64 Gram matrix."""
    w64 = w.double() if w.shape[0] >= w.shape[1] else w.double().T
    return torch.linalg.eigvalsh(w64.T @ w64).flip(0).clamp_min(0).sqrt()  # (k, m) @ (m, k) -> (k, k)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def optimal_rank(s: np.ndarray, allowed_sq: float) -> int:
    tail = np.append(np.cumsum((s**2)[::-1])[::-1], 0.0)
    return int(np.argmax(tail <= allowed_sq))


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def per_tensor(tensors: dict[str, torch.Tensor]) -> list[str]:
    lines = [
        row(
            "tensor",
            "shape",
            "baseline svd s",
            "policy",
            "lowrank s",
            "speed-up",
            "error / optimal",
            "rank / optimal",
            "bound met",
        ),
        row(*["---"] * 9),
    ]
    spectrum_lines = [
        row(
            "shape",
            "svd s",
            "svdvals s",
            "lowrank s",
            "× vs svd",
            "× vs svdvals",
            "max Δσ vs svdvals (×σmax)",
            "max Δσ vs σ₆₄ (×σmax)",
            "Gram₆₄ eigvalsh s",
            "Gram₆₄ max Δσ vs σ₆₄ (×σmax)",
        ),
        row(*["---"] * 10),
    ]
    for name, w16 in tensors.items():
        w = w16.float()
        m, n = w.shape
        t_svd, (u, s, vh) = timed(lambda w=w: torch.linalg.svd(w, full_matrices=False))
        s64 = s.double().numpy()
        total = float((s64**2).sum())
        # analyze's spectrum: lowrank's singular values against svd, svdvals and the float64 Gram route
        t_vals, s32 = timed(lambda w=w: torch.linalg.svdvals(w))
        t_ours, ours = timed(lambda w=w: lowrank_spectrum(w))
        t_gram, gram = timed(lambda w=w: _gram_values(w))
        exact64 = torch.linalg.svdvals(w.double())
        smax = float(exact64[0])
        spectrum_lines.append(
            row(
                f"{m}×{n}",
                f"{t_svd:.2f}",
                f"{t_vals:.2f}",
                f"{t_ours:.2f}",
                f"{t_svd / t_ours:.1f}",
                f"{t_vals / t_ours:.2f}",
                f"{float((ours - s32.double()).abs().max()) / smax:.1e}",
                f"{float((ours.double() - exact64).abs().max()) / smax:.1e}",
                f"{t_gram:.2f}",
                f"{float((gram - exact64).abs().max()) / smax:.1e}",
            )
        )
        # Targets whose optimal rank is min(m, n)/10 and /12, inside the ≤ min(m, n)/8 regime.
        tail = np.append(np.cumsum((s64**2)[::-1])[::-1], 0.0)
        error_at = float(np.sqrt(tail[min(m, n) // 10] / total))
        energy_at = float(1 - tail[min(m, n) // 12] / total)
        policies = ({"rank": 64}, {"max_error": round(error_at, 4)}, {"energy": round(energy_at, 4)})
        for policy in policies:
            target = policy.get("max_error", (1 - policy["energy"]) ** 0.5 if "energy" in policy else None)
            r_opt = policy["rank"] if target is None else optimal_rank(s64, target**2 * total)
            # the baseline's time includes its truncation and error measurement
            t_trunc, _ = timed(lambda u=u, s=s, vh=vh, r=r_opt: (u[:, :r] * s[:r]) @ vh[:r])
            optimal_error = float(np.sqrt((s64[r_opt:] ** 2).sum() / total))
            t_ours, rank, error = run_lowrank(w, policy)
            met = "—" if target is None else ("yes" if error <= target else "NO")
            lines.append(
                row(
                    name,
                    f"{m}×{n}",
                    f"{t_svd + t_trunc:.2f}",
                    ", ".join(f"{key} {value}" for key, value in policy.items()),
                    f"{t_ours:.2f}",
                    f"{(t_svd + t_trunc) / t_ours:.1f}×",
                    f"{error / optimal_error:.4f}",
                    f"{rank}/{r_opt} = {rank / r_opt:.3f}",
                    met,
                )
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return lines + [""] + spectrum_lines


def run_lowrank(w: torch.Tensor, policy: dict) -> tuple[float, int, float]:
    """lowrank_cli.factorize (which measures its own error to check a target), then the error here, in float64."""
    t_ours, (b, a) = timed(lambda: lowrank_cli.factorize(w, **policy))
    residual = w.double() - b.double() @ a.double()  # (m, r) @ (r, n) -> (m, n)
    return t_ours, b.shape[1], float(residual.norm() / w.double().norm())


def lowrank_spectrum(w: torch.Tensor) -> torch.Tensor:
    """What `lowrank analyze` reports for one tensor, read from a file as the command does."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        save_file({"w": w.contiguous()}, path)
        report = lowrank_cli.analyze(path, device="cpu")
    return torch.tensor(report.tensors[0].singular_values, dtype=torch.float64)


def peak_rss_run(folder: Path, layers: int) -> list[str]:
    """Write a ≥ 2 GB sharded checkpoint, then compress it in a child process and read its peak RSS."""
    ckpt = folder / "llama-layers"
    ckpt.mkdir()
    weight_map = {}
    for layer in range(layers):
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {
            f"model.layers.{layer}.{name}": realistic(m, n, seed=100 * layer + i)
            for i, (name, (m, n)) in enumerate(LAYER.items())
        }
        save_file(tensors, ckpt / shard, metadata={"format": "pt"})
        weight_map |= {name: shard for name in tensors}
        del tensors
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    largest_f32 = 11008 * 4096 * 4
    out = folder / "llama-layers.lowrank"
    # The child reports its own high-water mark: getrusage(RUSAGE_CHILDREN) would include the
    # pages it shared with this (large) parent between fork and exec.
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['lowrank', 'compress', {str(ckpt)!r}, '--rank', '64', '-o', {str(out)!r}, '--json']\n"
        "try:\n    runpy.run_module('lowrank_cli', run_name='__main__')\n"
        "finally:\n    sys.stderr.write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    elapsed, proc = timed(lambda: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True))
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak = int(proc.stderr.strip().splitlines()[-1].split()[1]) * 1024  # "VmHWM:  123456 kB"
    limit = 400e6 + 4 * largest_f32
    return [
        row("checkpoint", "size", "compress --rank 64", "peak RSS", "limit 400 MB + 4×largest f32", "within"),
        row(*["---"] * 6),
        row(
            f"{layers} LLaMA-7B layers, {layers} shards, bf16",
            f"{size / 1e9:.2f} GB",
            f"{elapsed:.0f} s",
            f"{peak / 1e6:.0f} MB",
            f"{limit / 1e6:.0f} MB",
            "yes" if peak <= limit else "NO",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one tensor per shape; skip the 2 GB RSS run")
    parser.add_argument("--layers", type=int, default=5, help="layers in the RSS checkpoint (5 ≈ 2 GB)")
    parser.add_argument("--divide", type=int, default=1, help="divide every dimension by this (a smoke run: 16)")
    args = parser.parse_args()
    torch.manual_seed(0)
    names = ["self_attn.q_proj.weight", "mlp.up_proj.weight"] if args.quick else list(LAYER)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    tensors = {name: realistic(*(d // args.divide for d in LAYER[name]), seed=i) for i, name in enumerate(names)}
    lines = per_tensor(tensors)
    del tensors
    if not args.quick:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
            lines += [""] + peak_rss_run(Path(folder), args.layers)
    t_help, _ = timed(lambda: subprocess.run([sys.executable, "-m", "lowrank_cli", "--help"], capture_output=True))
    t_import, _ = timed(lambda: subprocess.run([sys.executable, "-c", "import torch"], capture_output=True))
    lines += ["", row("`lowrank --help`", f"{t_help:.2f} s", "`import torch` alone", f"{t_import:.2f} s")]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
