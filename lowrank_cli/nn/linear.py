"""Layers that run the factors: y = B·(A·x) + b, never forming the dense W = B·A."""

from __future__ import annotations

import functools
import math
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.errors import UsageError
from lowrank_cli.io.hfconfig import is_conv1d
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.ops.factoring import factor_weight
from lowrank_cli.ops.settings import Method, Settings

if TYPE_CHECKING:
    from lowrank_cli.nn.siblings import Siblings


class LowRankLinear(nn.Module):
    """A Linear layer whose weight is stored as factors: W = B·A, B (out, r), A (r, in).

    `forward` costs r·(in + out) multiply-adds per input row instead of in·out.

    Args:
        in_features, out_features, bias, device, dtype: as for nn.Linear.
        rank: r, the inner size of the factors.

    A new layer is initialised (reset_parameters) so that W = B·A has nn.Linear's variance,
    Var(W_ij) = 1/(3·in): A ~ U(−1/√in, 1/√in), B ~ U(−√(3/r), √(3/r)), and the bias as
    nn.Linear's, U(−1/√in, 1/√in). `from_factors` and `from_linear` build one from known factors.

    Attributes:
        A: (rank, in_features) parameter.
        B: (out_features, rank) parameter.
        bias: (out_features,) parameter, or None.
        transposed: True when the layer replaces a GPT-2 style Conv1D, whose stored weight is
            (in, out) = Wᵀ; save_factors then writes the factors of Wᵀ under the Conv1D's name.
        rel_error: ‖W − B·A‖_F / ‖W‖_F against the dense weight the factors were made from, when known.
        siblings: the Siblings this layer computes A·x with (layers that read the same input, their
            A's stacked: see fuse_siblings), or None.

    Example:
        >>> layer = LowRankLinear.from_linear(nn.Linear(512, 256), rank=32)
        >>> layer(torch.randn(4, 512)).shape
        torch.Size([4, 256])
        >>> LowRankLinear(512, 256, rank=32)  # randomly initialised, to train
        LowRankLinear(in_features=512, out_features=256, rank=32, bias=True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.transposed = False
        self.rel_error: float | None = None
        self.siblings: Siblings | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random factors whose product has nn.Linear's variance (see the class docstring)."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0
        nn.init.uniform_(self.A, -bound, bound)  # Var(A_kj) = 1/(3·in)
        spread = math.sqrt(3 / self.rank) if self.rank else 0.0
        nn.init.uniform_(self.B, -spread, spread)  # Var(B_ik) = 1/r
        # W_ij = Σ_k B_ik·A_kj, r independent terms: Var(W_ij) = r · (1/r) · 1/(3·in) = 1/(3·in)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_factors(
        cls, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None = None, *, rel_error: float | None = None
    ) -> LowRankLinear:
        """The layer x ↦ B·(A·x) + bias, holding the given tensors themselves (no copy).

        Args:
            b: (out, r) factor B.
            a: (r, in) factor A.
            bias: (out,) tensor, or None for no bias.
            rel_error: ‖W − B·A‖_F / ‖W‖_F against the weight the factors were made from, if known.

        Example:
            >>> LowRankLinear.from_factors(torch.randn(256, 32), torch.randn(32, 512)).rank
            32
        """
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise UsageError(
                f"factors B {tuple(b.shape)} and A {tuple(a.shape)} do not multiply; B is (out, r), A (r, in)"
            )
        if bias is not None and bias.shape != (b.shape[0],):
            raise UsageError(f"bias {tuple(bias.shape)} does not fit B {tuple(b.shape)}; it must be ({b.shape[0]},)")
        layer = cls(a.shape[1], b.shape[0], a.shape[0], bias is not None, device="meta")
        layer.B, layer.A = _parameter(b), _parameter(a)
        if bias is not None:
            layer.bias = _parameter(bias)
        layer.rel_error = rel_error
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Module, *, rank: int | None = None, energy: float | None = None, max_error: float | None = None
    ) -> LowRankLinear:
        """Truncated-SVD factors of an nn.Linear (or a GPT-2 Conv1D), with its bias and dtype.

        Args:
            linear: the layer to factorize; it is left unchanged.
            rank / energy / max_error: exactly one rank policy, as for `lowrank compress`.

        Example:
            >>> LowRankLinear.from_linear(nn.Linear(64, 64), rank=8).rank
            8
        """
        policy = RankPolicy.from_options(rank=rank, energy=energy, max_error=max_error)
        if policy is None:
            raise UsageError("from_linear needs one of rank=, energy= or max_error=")
        weight, transposed = linear_weight(linear)  # (out, in)
        # compress's own factor step: the float16 split, the overflow check and the error measured as stored
        outcome = factor_weight(weight, policy, Settings(method=Method.exact), where=f"{type(linear).__name__} weight")
        if outcome.b is None:
            raise UsageError(f"{type(linear).__name__}: its weight is zero; there is nothing to factorize")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls.from_factors(outcome.b, outcome.a, bias, rel_error=outcome.rel_error)
        layer.transposed = transposed
        return layer.to(weight.device)

    def to_linear(self) -> nn.Linear:
        """The dense nn.Linear with weight B·A (computed in float32 or wider, stored in the factors' dtype)."""
        work = torch.float64 if self.B.dtype == torch.float64 else torch.float32
        weight = self.B.detach().to(work) @ self.A.detach().to(work)  # (out, r) @ (r, in) -> (out, in)
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(self.B.dtype))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = None if self.siblings is None else self.siblings.a_product(self, x)  # A·x computed with its siblings'
        if h is None:
            h = linear(x, self.A)  # (…, in) @ (in, r) -> (…, r)
        return linear(h, self.B, self.bias)  # (…, r) @ (r, out) + b -> (…, out)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={bias}"


class LowRankEmbedding(nn.Module):
    """An embedding table stored as factors: E = B·A, B (num, r), A (r, dim); row i is B[i]·A.

    A lookup reads one row of B and multiplies by A, so the num×dim table never exists.

    Args:
        num_embeddings, embedding_dim, padding_idx, device, dtype: as for nn.Embedding.
        rank: r, the inner size of the factors.

    A new table is initialised (reset_parameters) so that E = B·A has nn.Embedding's variance,
    Var(E_ij) = 1: B ~ N(0, 1), A ~ N(0, 1/r); the padding row of B (so of E) is zero.
    `from_factors` builds one from known factors.

    Attributes:
        A: (rank, embedding_dim) parameter.
        B: (num_embeddings, rank) parameter.
        rel_error: ‖E − B·A‖_F / ‖E‖_F against the table the factors were made from, when known.

    Example:
        >>> table = LowRankEmbedding(30522, 384, rank=64, padding_idx=0)
        >>> table(torch.tensor([[101, 2023, 102]])).shape
        torch.Size([1, 3, 384])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise UsageError(f"padding_idx {padding_idx} is not a row of a {num_embeddings}-row table")
            padding_idx %= num_embeddings  # as nn.Embedding: -1 is the last row
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.A = nn.Parameter(torch.empty(rank, embedding_dim, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(num_embeddings, rank, device=device, dtype=dtype))
        self.rel_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random factors whose product has nn.Embedding's variance (see the class docstring)."""
        nn.init.normal_(self.B)  # Var(B_ik) = 1
        nn.init.normal_(self.A, std=1 / math.sqrt(self.rank) if self.rank else 0.0)  # Var(A_kj) = 1/r
        # E_ij = Σ_k B_ik·A_kj, r independent terms: Var(E_ij) = r · 1 · (1/r) = 1
        if self.padding_idx is not None:
            with torch.no_grad():
                self.B[self.padding_idx].zero_()

    @classmethod
    def from_factors(
        cls, b: torch.Tensor, a: torch.Tensor, padding_idx: int | None = None, *, rel_error: float | None = None
    ) -> LowRankEmbedding:
        """The table whose row i is B[i]·A, holding the given tensors themselves (no copy).

        Args:
            b: (num_embeddings, r) factor B.
            a: (r, embedding_dim) factor A.
            padding_idx: as for nn.Embedding: the row whose gradient stays zero. B's row is kept as given.
            rel_error: ‖E − B·A‖_F / ‖E‖_F against the table the factors were made from, if known.

        Example:
            >>> LowRankEmbedding.from_factors(torch.randn(1000, 16), torch.randn(16, 64)).embedding_dim
            64
        """
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise UsageError(
                f"factors B {tuple(b.shape)} and A {tuple(a.shape)} do not multiply; B is (num, r), A (r, dim)"
            )
        table = cls(b.shape[0], a.shape[1], a.shape[0], padding_idx, device="meta")
        table.B, table.A = _parameter(b), _parameter(a)
        table.rel_error = rel_error
        return table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # (…,) -> (…, r) @ (r, dim) -> (…, dim)
        return F.embedding(ids, self.B, self.padding_idx) @ self.A

    def extra_repr(self) -> str:
        padding = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}{padding}"


class Kernel(str, Enum):
    """How `linear` runs x·Wᵀ; `kernel_for` picks one by rule."""

    linear = "F.linear"  # torch's own choice
    aten_gemv = "ATen's gemv"  # F.linear with oneDNN off for the call: ATen's matrix-vector kernel
    onednn_mv = "oneDNN's W·x"  # torch.mv(W, x): oneDNN with W as stored, x as the vector


# With AMX, the most elements of a bfloat16 W whose one-row product ATen's gemv ran faster than oneDNN
# (about 2 MiB, a core's L2 on the Xeon measured); larger ones ran faster on oneDNN as W·x. Without AMX
# (an AMD EPYC with avx512_bf16) ATen's gemv was the fastest at every size measured, up to TinyLlama's
# 5632×2048: benchmarks/bench_kernels.py times each way.
ATEN_GEMV_MAX = 1 << 20


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), from torch's cpuinfo or else
    /proc/cpuinfo's flags: oneDNN's bfloat16 kernels differ with them, so the kernel rule does too."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own cpuinfo read (torch ≥ 2.3)
    if probe is not None:
        return bool(probe())
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_tile" in line.split() for line in text.splitlines())


def kernel_for(x: torch.Tensor, weight: torch.Tensor) -> Kernel:
    """The kernel `linear` runs x·Wᵀ on: by rule, from the dtype, the device, the CPU's AMX, the rows
    of x and W's size.

    torch sends every bfloat16 product on a CPU with oneDNN to oneDNN, as x·Wᵀ with W transposed.
    For one row of x (a decode step at batch 1) ATen's own matrix-vector kernel (float32 sums on
    the vector unit) ran about twice as fast: on a CPU without AMX (an AMD EPYC) at every size
    measured; on a Xeon with AMX up to ATEN_GEMV_MAX elements, the factors' usual size, and
    oneDNN's matrix-vector product W·x ran faster for a larger W. From two rows on, oneDNN's x·Wᵀ
    is far faster than ATen's; float16 and float32 showed no such gaps, so they keep F.linear.
    No timing is taken at run time: benchmarks/bench_kernels.py times each way.
    """
    if (
        weight.dtype != torch.bfloat16
        or not _ONEDNN
        or not weight.is_cpu
        or x.numel() != x.shape[-1]  # more than one row, whatever the leading dims
        or weight.dim() != 2
        or weight.stride(1) != 1  # stored by columns (a float32 B turned bfloat16): ATen's gemv is slow there
        or not torch._C._get_mkldnn_enabled()  # a user who turned oneDNN off has ATen's kernel anyway
    ):
        return Kernel.linear
    if not has_amx() or weight.numel() <= ATEN_GEMV_MAX:
        return Kernel.aten_gemv
    return Kernel.onednn_mv


def b_by_columns(b: torch.Tensor) -> bool:
    """Whether a factor B (out, r) runs faster stored by columns (Bᵀ contiguous) than by rows: by rule,
    from its dtype and device.

    h·Bᵀ for one float32 row h on the CPU (MKL's gemv, AMD EPYC measured) ran 1.3-2× faster with Bᵀ
    contiguous, a sum of B's columns scaled by h, than as out dot products of length r, the short
    side of a tall B; for 8 rows about 1.3× faster, for 512 the same (benchmarks/bench_kernels.py).
    bfloat16 runs one row on ATen's gemv (kernel_for), which is 3-15× slower on columns, so it
    keeps B by rows, as do other dtypes and devices, not measured.
    """
    return b.dtype == torch.float32 and b.is_cpu


def lay_out_factors(model: nn.Module) -> int:
    """Store each LowRankLinear's B by columns or by rows, as b_by_columns says for its dtype and device.

    Only the memory order changes (B is B.t().contiguous().t(), or B.contiguous()): shapes, names,
    values and the state_dict are as they were. A B that is not yet in that order is copied once
    (a tensor that maps a file then reads it whole); one that another module shares (tied weights)
    is left alone. load_pretrained calls this; call it again after a model's dtype or device changed
    with `.to()`, as fuse_siblings.

    Returns:
        How many B's were copied into the other order.

    Example:
        >>> lay_out_factors(model.float())  # float32 on the CPU: each B by columns
        154
    """
    holders: dict[int, int] = {}
    for module in model.modules():
        for tensor in module._parameters.values():
            if tensor is not None:
                holders[id(tensor)] = holders.get(id(tensor), 0) + 1
    copied = 0
    for module in model.modules():
        if not isinstance(module, LowRankLinear) or holders[id(module.B)] != 1:
            continue
        b = module.B
        if b_by_columns(b):
            if b.t().is_contiguous():
                continue
            ordered = b.detach().t().contiguous().t()  # (out, r) whose transpose (r, out) is contiguous
        elif b.is_contiguous():
            continue
        else:
            ordered = b.detach().contiguous()
        module.B = nn.Parameter(ordered, requires_grad=b.requires_grad)
        copied += 1
    return copied


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b, as F.linear computes it, on the kernel that `kernel_for` picks.

    Example:
        >>> linear(torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(8, 64, dtype=torch.bfloat16)).shape
        torch.Size([1, 8])
    """
    kernel = kernel_for(x, weight)
    if kernel is Kernel.linear:
        return F.linear(x, weight, bias)
    if kernel is Kernel.onednn_mv:
        vector = x.reshape(-1)  # (in,)
        # (out, in) @ (in,) -> (out,), plus the bias
        y = torch.mv(weight, vector) if bias is None else torch.addmv(bias, weight, vector)
        return y.view(*x.shape[:-1], weight.shape[0])
    # torch.backends.mkldnn.enabled, without the module property's Python layers (a product here takes µs).
    # The switch is process-wide: another thread's product meanwhile runs on ATen too, only slower.
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(True)


_ONEDNN = torch.backends.mkldnn.is_available()


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """The (out, in) weight of an nn.Linear or a GPT-2 Conv1D, and whether it is stored transposed."""
    if isinstance(module, nn.Linear):
        return module.weight, False
    if is_conv1d(module):
        return module.weight.t(), True
    raise UsageError(
        f"{type(module).__name__} is not an nn.Linear or a GPT-2 Conv1D; LowRankLinear replaces only those"
    )


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return (
        tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    )
