"""Singular-value spectra and the ranks read off them."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_SPARK = "▁▂▃▄▅▆▇█"
# max |W| outside this range is divided out before any product or SVD: entries near 1e30 overflow
# float32 in WᵀW·Ω, and ones near 1e-30 underflow it; the factors of W/peak, times peak, do not.
SAFE_SCALE = (1e-6, 1e6)


def in_safe_scale(peak: float) -> bool:
    return SAFE_SCALE[0] <= peak <= SAFE_SCALE[1]


def break_even_rank(m: int, n: int) -> int:
    """The largest r with r·(m + n) < m·n: above it, factors hold more numbers than W."""
    return (m * n - 1) // (m + n)


_TIE = 1e-9  # a target met to within rounding of the SVD itself counts as met
ROUTES = ("svdvals", "gram")
_SMALL = 256  # up to this min(m, n) svdvals takes milliseconds: no need to measure anything
_PROBE = 2048  # the micro-benchmark's size: at 1024 the two routes' ratio is still 0.65 of that at 4096
_GRAM_BLOCKS = 4
_GRAM_FLOOR = 1e-6  # relative to σ_max, the Gram route's worst-case absolute error for n up to ~9000
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class Spectrum:
    """The singular values of an m×n matrix (float64, descending) and what follows from them."""

    singular_values: np.ndarray  # of W / scale
    shape: tuple[int, int]
    eps: float  # machine epsilon of the dtype the values were computed in
    scale: float = 1.0  # σ_i(W) = scale · singular_values[i]; every rank below depends on ratios only

    @classmethod
    def of(
        cls, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype | None = None, scale: float = 1.0
    ) -> Spectrum:
        """Wrap singular values of a matrix whose computation dtype is `dtype` (default: the values')."""
        eps = float(torch.finfo(dtype or values.dtype).eps)
        return cls(values.detach().to("cpu", torch.float64).numpy(), tuple(shape), eps, scale)

    @property
    def _top(self) -> float:
        return float(self.singular_values[0]) if self.singular_values.size else 0.0

    @property
    def sigma_max(self) -> float:
        return self._top * self.scale

    @property
    def is_zero(self) -> bool:
        return self._top == 0.0

    @property
    def _relative(self) -> np.ndarray:
        """σ_i / σ_max."""
        return self.singular_values / self._top if not self.is_zero else np.zeros_like(self.singular_values)

    @property
    def _shares(self) -> np.ndarray:
        """σ_i² / Σσ²: each term's share of ‖W‖_F², computed on σ/σ_max so no scale overflows."""
        if self.is_zero:
            return np.zeros_like(self.singular_values)
        squares = self._relative**2
        return squares / squares.sum()

    @property
    def _tail(self) -> np.ndarray:
        """tail[r] = Σ_{i≥r} shares, summed from the small end so it does not cancel."""
        return np.append(np.cumsum(self._shares[::-1])[::-1], 0.0)

    def numerical_rank(self, rtol: float | None = None) -> int:
        """Count of σ_i > σ_max·tol, tol = max(m, n)·ε as numpy.linalg.matrix_rank uses."""
        tol = rtol if rtol is not None else max(self.shape) * self.eps
        return int(np.count_nonzero(self._relative > tol))

    @property
    def stable_rank(self) -> float:
        """‖W‖_F² / σ_max²."""
        return float((self._relative**2).sum())

    def gains(self) -> np.ndarray:
        """How much relative squared error each rank-1 term removes: σ_i² / ‖W‖_F²."""
        return self._shares

    def rank_for_energy(self, fraction: float) -> int:
        """The smallest r with Σ_{i≤r} σ_i² ≥ fraction·Σσ²."""
        if self.is_zero:
            return 0
        cumulative = np.cumsum(self._shares)
        needed = fraction * cumulative[-1] * (1 - _TIE)
        return min(int(np.searchsorted(cumulative, needed, side="left")) + 1, len(cumulative))

    def relative_error(self, rank: int) -> float:
        """‖W − W_r‖_F / ‖W‖_F for the best rank-r approximation (Eckart–Young)."""
        if self.is_zero:
            return 0.0
        return float(np.sqrt(self._tail[min(rank, self.singular_values.size)]))

    def rank_for_error(self, max_error: float) -> int:
        """The smallest r whose best rank-r approximation has relative error ≤ max_error."""
        if self.is_zero:
            return 0
        errors = np.sqrt(self._tail)  # non-increasing in r
        return int(np.argmax(errors <= max_error * (1 + _TIE)))

    def sparkline(self, width: int = 16) -> str:
        """The decay of σ on a log scale, σ_max at the left, one block per sampled value."""
        relative = self._relative
        if relative.size == 0 or self.is_zero:
            return ""
        picks = relative[np.unique(np.linspace(0, relative.size - 1, min(width, relative.size)).round().astype(int))]
        logs = np.log10(np.maximum(picks, self.eps))  # ≤ 0, floored at ε
        depth = max(-np.log10(self.eps), 1.0)
        levels = np.clip(((logs + depth) / depth * (len(_SPARK) - 1)).round().astype(int), 0, len(_SPARK) - 1)
        return "".join(_SPARK[level] for level in levels)


def singular_values(matrix: torch.Tensor, *, rtol: float | None = None) -> tuple[torch.Tensor, float]:
    """All singular values of W / scale (descending) and scale = max |W_ij|, by the faster route here.

    Routes (spectrum_route chooses), each against numpy's float64 singular values of the same W:
    - "svdvals": LAPACK's bidiagonal SVD without vectors, in W's dtype: |Δσ| ≲ a few ε·σ_max
      (ε of float32: ~1e-6·σ_max measured on 4096², relative accuracy for small σ included).
    - "gram": √eigvalsh(WᵀW), the Gram matrix of a float32 W formed in float64 (products of two
      float32 are exact there): |Δσ_i| ≤ |Δλ_i| / σ_i with |Δλ| ≲ √n·ε₆₄·σ_max² typical (n·ε₆₄ at worst),
      so ~1e-13·σ_max for σ of any size that matters and at most √(n·ε₆₄)·σ_max (7e-7 for n = 4096)
      for σ near 0. Squaring loses small σ's relative accuracy, not the absolute 1e-6·σ_max, and that
      floor is 8√n times below the numerical-rank line max(m, n)·ε₃₂·σ_max, so ranks count the same.
    Dividing by max |W| first keeps σ finite when entries near the dtype's maximum would overflow it.
    `rtol`: the numerical-rank tolerance the caller will use, if it is its own: below the Gram
    route's floor, svdvals is used.
    """
    peak = max_abs(matrix)
    if peak == 0.0 or not in_safe_scale(peak):
        scale = peak or 1.0
        matrix = matrix / scale
    else:
        scale = 1.0
    if spectrum_route(matrix, rtol=rtol) == "gram":
        return gram_singular_values(matrix), scale
    return torch.linalg.svdvals(_tall(matrix)), scale


def gram_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """σ(W) as √eigenvalues of the float64 Gram matrix of W's short side, descending, in float64."""
    w = _tall(matrix).to(torch.float64)  # (m, k), m ≥ k
    k = w.shape[1]
    gram = w.new_empty(k, k)
    # eigvalsh reads the lower triangle only: forming it by column blocks takes 5/8 of the products.
    edges = [round(i * k / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)]
    for start, end in zip(edges, edges[1:], strict=False):
        torch.matmul(w[:, start:].T, w[:, start:end], out=gram[start:, start:end])  # (k−start, m) @ (m, b)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def spectrum_route(matrix: torch.Tensor, *, rtol: float | None = None) -> str:
    """ "gram" or "svdvals": which singular_values uses for this matrix on this machine.

    svdvals where Gram's absolute floor would matter or nothing was measured: float64 matrices
    (their numerical-rank line n·ε₆₄·σ_max is below it), a caller's rtol below it, other devices
    than the CPU, and small matrices, where both take milliseconds. Otherwise the one that was
    faster on this machine (measured_route): the ratio swings both ways between CPUs, from Gram
    2× faster (AMD EPYC, MKL) to svdvals 1.6× faster (Intel Xeon with AMX).
    """
    forced = os.environ.get("LOWRANK_SPECTRUM_ROUTE")
    if forced in ROUTES:
        return forced
    if matrix.dtype != torch.float32 or matrix.device.type != "cpu" or min(matrix.shape) <= _SMALL:
        return "svdvals"
    if rtol is not None and rtol < _GRAM_FLOOR:
        return "svdvals"
    return measured_route()["route"]


@functools.cache
def measured_route() -> dict:
    """The faster spectrum route on this machine, from a cached micro-benchmark, and its timings.

    Timed once per machine (CPU model, its vector ISA, thread count, torch version and oneDNN/MKL
    caps) on one float32 _PROBE×_PROBE matrix, twice in turn (a few seconds), and kept in the
    user's cache folder ($LOWRANK_CACHE_DIR, else $XDG_CACHE_HOME/lowrank or ~/.cache/lowrank).
    A machine busy with other work slows svdvals more than Gram; delete the file to time again.
    """
    key = machine_key()
    path = _cache_dir() / "spectrum_route.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}  # never a FIFO's open()
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and entry.get("route") in ROUTES:
        return entry
    entry = _time_routes()
    cached[key] = entry
    try:  # a read-only home only costs the next run the same second
        path.parent.mkdir(parents=True, exist_ok=True)
        spare = path.with_name(f".{path.name}.{os.getpid()}")
        spare.write_text(json.dumps(cached, indent=1), encoding="utf-8")
        os.replace(spare, path)
    except OSError:
        pass
    return entry


def _time_routes() -> dict:
    probe = torch.randn(_PROBE, _PROBE, generator=torch.Generator().manual_seed(0))
    routes = {"svdvals": torch.linalg.svdvals, "gram": gram_singular_values}
    seconds = {route: float("inf") for route in routes}
    for compute in routes.values():
        compute(probe[:64, :64])  # load the library code before timing
    for _ in range(2):  # in turn, best of two: a busy machine slows one route's run, not both of the other's
        for route, compute in routes.items():
            start = time.perf_counter()
            compute(probe)
            seconds[route] = min(seconds[route], time.perf_counter() - start)
    return {"route": min(seconds, key=seconds.get), **{f"{route}_s": round(t, 4) for route, t in seconds.items()}}


def machine_key() -> str:
    """What decides which route is faster: CPU model, vector ISA, threads, torch, and ISA caps."""
    model, flags = cpu_description()
    caps = ",".join(f"{v}={os.environ[v]}" for v in _ISA_CAPS if v in os.environ)
    return f"{model} | {' '.join(flags)} | threads={torch.get_num_threads()} | torch {torch.__version__} | {caps}"


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of the vector ISAs that matter here it has (Linux; else platform's)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), []
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    have = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else platform.machine()), [f for f in _ISA_FLAGS if f in have]


def _cache_dir() -> Path:
    if os.environ.get("LOWRANK_CACHE_DIR"):
        return Path(os.environ["LOWRANK_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowrank"


def _tall(matrix: torch.Tensor) -> torch.Tensor:
    """W, or Wᵀ (a view, same singular values) if W is wide: LAPACK's SVD is faster on the tall
    layout, 1.5× for svdvals and 2× for svd on 4096×11008 here."""
    return matrix.T if matrix.shape[0] < matrix.shape[1] else matrix


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD W = U·diag(S)·Vh, of Wᵀ when W is wide: Wᵀ = U'·S·Vh' gives W = Vh'ᵀ·S·U'ᵀ."""
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(matrix, full_matrices=False)


def max_abs(matrix: torch.Tensor) -> float:
    """max |W_ij| without an |W| temporary (aminmax is 6× faster than the ∞-norm)."""
    if not matrix.numel():
        return 0.0
    low, high = torch.aminmax(matrix)
    return max(-float(low), float(high))
