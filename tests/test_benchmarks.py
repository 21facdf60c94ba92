"""The benchmark scripts still run against the current code: a smoke run on their smallest input,
whose figures are not checked here (benchmarks/README.md holds them, each with its machine)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_llama_benchmark_smoke_run(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_llama_layer.py"), "--quick", "--divide", "16"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| self_attn.q_proj.weight | 256×256 |")]
    assert len(rows) == 3  # rank 64, a max-error target and an energy target
    assert all(row.rstrip(" |").split("|")[-1].strip() in ("yes", "—") for row in rows)


def _run(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("CPU: ")  # every figure comes with the machine it was measured on
    return run


def test_cpu_benchmark_smoke_run(tmp_path):
    run = _run("bench_cpu.py", "--size", "256", "--rank", "8", "--repeats", "1", cwd=tmp_path)
    rows = [line for line in run.stdout.splitlines() if line.startswith("| lowrank_cli.")]
    assert len(rows) == 3  # compress at a rank, compress to an error bound, analyze


def test_spectrum_benchmark_smoke_run(tmp_path):
    run = _run("bench_spectrum.py", "--quick", cwd=tmp_path)
    assert [line.split(" | ")[0] for line in run.stdout.splitlines() if line.startswith("| 3")] == ["| 320×320"]
