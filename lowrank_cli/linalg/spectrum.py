"""Singular-value spectra and the ranks read off them."""

from __future__ import annotations

import contextlib
import functools
import re
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


# Factors holding more than this share of W's params read and multiply at least that share of what W
# does, in two products instead of one: at most 1/0.8 = 1.25× less work, which the second product's
# overhead, or the thin products' lower efficiency (bfloat16 with many rows), can take back
# (benchmarks/bench_kernels.py times factors against W at 50–90 % of its params).
SPEED_SHARE = 0.8


def speed_rank(m: int, n: int) -> int:
    """The largest r with r·(m + n) ≤ SPEED_SHARE·m·n: above it, factors save params but little time."""
    return int(SPEED_SHARE * m * n) // (m + n)


_TIE = 1e-9  # a target met to within rounding of the SVD itself counts as met
ROUTES = ("svdvals", "gram")
_GRAM_MIN = 1024  # below this min(m, n) which route is faster varied from run to run (bench_spectrum)
_GRAM_BLOCKS = 4
_GRAM_FLOOR = 1e-6  # relative to σ_max, the Gram route's worst-case absolute error for n up to ~9000
_GRAM_VENDORS = ("AuthenticAMD",)  # the CPUs where Gram was measured faster than svdvals
_ONE_THREAD_BELOW = 1024  # min(m, n) under which LAPACK's spectrum runs on one CPU thread (bench_spectrum)


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


def singular_values(
    matrix: torch.Tensor, *, rtol: float | None = None, route: str | None = None
) -> tuple[torch.Tensor, float]:
    """All singular values of W / scale (descending) and scale = max |W_ij|.

    Routes (`route`, default spectrum_route's choice), each against numpy's float64 singular values of the same W:
    - "svdvals": LAPACK's bidiagonal SVD without vectors, in W's dtype: |Δσ| ≲ a few ε·σ_max
      (ε of float32: ~1e-6·σ_max measured on 4096², relative accuracy for small σ included).
    - "gram": √eigvalsh(WᵀW), the Gram matrix of a float32 W formed in float64 (products of two
      float32 are exact there): |Δσ_i| ≤ |Δλ_i| / σ_i with |Δλ| ≲ √n·ε₆₄·σ_max² typical (n·ε₆₄ at worst),
      so ~1e-13·σ_max for σ of any size that matters and at most √(n·ε₆₄)·σ_max (7e-7 for n = 4096)
      for σ near 0. Squaring loses small σ's relative accuracy, not the absolute 1e-6·σ_max, and that
      floor is 8√n times below the numerical-rank line max(m, n)·ε₃₂·σ_max, so ranks count the same.
    Dividing by max |W| first keeps σ finite when entries near the dtype's maximum would overflow it.
    A CPU matrix under 1024 on its short side is done on one thread (spectrum_threads): torch's
    thread count, process-wide, is 1 for the call and restored after it.
    `rtol`: the numerical-rank tolerance the caller will use, if it is its own: below the Gram
    route's floor, svdvals is used.
    """
    peak = max_abs(matrix)
    if peak == 0.0 or not in_safe_scale(peak):
        scale = peak or 1.0
        matrix = matrix / scale
    else:
        scale = 1.0
    if route not in (None, *ROUTES):
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    with _torch_threads(spectrum_threads(matrix)):
        if (route or spectrum_route(matrix, rtol=rtol)) == "gram":
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


def spectrum_route(matrix: torch.Tensor, *, rtol: float | None = None, vendor: str | None = None) -> str:
    """ "gram" or "svdvals": which singular_values uses for this matrix, by a rule of dtype, shape,
    device and CPU (`vendor`: /proc/cpuinfo's vendor_id, default this machine's).

    Gram only where it was measured faster (benchmarks/bench_spectrum.py, figures in
    benchmarks/README.md): a float32 matrix of at least _GRAM_MIN on both sides, on the CPU of an
    x86 AMD machine with torch's MKL LAPACK, where Gram took 0.7–0.9 of svdvals' time at 1024 and
    0.4–0.65 at 2048–4096, at 1 and 2 threads. svdvals, torch's own answer, everywhere else: on an
    Intel Xeon with AMX svdvals was 1.2–1.6× faster than Gram at 4096, and CPUs never measured get
    no guess. Also svdvals wherever Gram's absolute floor would show: float64 matrices (their
    numerical-rank line n·ε₆₄·σ_max is below it) and a caller's rtol below it.
    """
    if matrix.dtype != torch.float32 or matrix.device.type != "cpu" or min(matrix.shape) < _GRAM_MIN:
        return "svdvals"
    if rtol is not None and rtol < _GRAM_FLOOR:
        return "svdvals"
    if (cpu_vendor() if vendor is None else vendor) in _GRAM_VENDORS and torch.backends.mkl.is_available():
        return "gram"
    return "svdvals"


def spectrum_threads(matrix: torch.Tensor) -> int | None:
    """1 where singular_values runs on one CPU thread, None where on torch's own count (torch.get_num_threads()).

    One thread for a CPU matrix with min(m, n) < _ONE_THREAD_BELOW: there LAPACK's reduction of W is
    thousands of small BLAS calls, and a second thread costs more in waking and waiting than it
    shares. bench_spectrum.py on 2 shared cores (benchmarks/README.md): svdvals on 2 threads took
    1.1–1.6× its time on one at 384–1024, MiniLM's 30522×384 embedding included, with OpenMP threads
    sleeping between parallel regions (OMP_WAIT_POLICY=PASSIVE, as the lowrank command sets it), and
    2–5× with them spinning. At 2048² the two were even; at 4096² two threads took 0.43 of one's time.
    """
    if matrix.device.type != "cpu" or min(matrix.shape) >= _ONE_THREAD_BELOW:
        return None
    return 1


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """torch's CPU thread count set to `count` (if fewer than now) inside the block, restored after."""
    before = torch.get_num_threads()
    if count is None or count >= before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor_id from /proc/cpuinfo ("AuthenticAMD", "GenuineIntel"), "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    found = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.MULTILINE)
    return found.group(1) if found else ""


def _tall(matrix: torch.Tensor) -> torch.Tensor:
    """W, or Wᵀ (a view, same singular values) if W is wide: LAPACK's SVD was measured faster on
    the tall layout of a wide LLM matrix (4096×11008), for svdvals and svd alike."""
    return matrix.T if matrix.shape[0] < matrix.shape[1] else matrix


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD W = U·diag(S)·Vh, of Wᵀ when W is wide: Wᵀ = U'·S·Vh' gives W = Vh'ᵀ·S·U'ᵀ."""
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(matrix, full_matrices=False)


def max_abs(matrix: torch.Tensor) -> float:
    """max |W_ij| from aminmax, one pass with no |W| temporary (the ∞-norm makes one)."""
    if not matrix.numel():
        return 0.0
    low, high = torch.aminmax(matrix)
    return max(-float(low), float(high))
