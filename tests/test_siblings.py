"""Running factors fast: the kernel rule of `linear` and sibling layers' stacked A·x (fuse_siblings).

Every path must give the product of the expanded dense weight, to the dtype's rounding. Expected
values are float64 maths on the factors; a path's rounding bound is (terms summed + 4)·ε·(|x|·|W|),
as tests/test_model.py bounds LowRankLinear. Shapes are odd on purpose: ranks, sizes and batch
sizes that no kernel's blocking divides.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import cli_json  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lowrank_cli.nn.linear as lowrank_linear  # noqa: E402
from lowrank_cli.nn import LowRankLinear, fuse_siblings, lay_out_factors, load_pretrained, save_factors  # noqa: E402
from lowrank_cli.nn.linear import ATEN_GEMV_MAX, Kernel, has_amx, kernel_for, linear  # noqa: E402
from lowrank_cli.nn.siblings import Siblings  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
IN = 37
SHAPES = {"q": (11, 5), "k": (13, 3), "v": (17, 7)}  # name: (out, rank)


def _bound(x: torch.Tensor, weight: torch.Tensor, terms: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rounding bound of x·Wᵀ (+ b) in x's dtype: (terms + 4)·ε·(|x|·|W|ᵀ + |b|), in float64."""
    magnitude = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return (terms + 4) * torch.finfo(x.dtype).eps * magnitude


def _factored_bound(x, b, a, bias=None):
    """A factored layer's bound: the sums of A·x and of B·h, and the rounding of h to the dtype."""
    return _bound(x, b.double().abs() @ a.double().abs(), a.shape[1] + b.shape[1] + 2, bias)


def _exact(x, b, a, bias=None):
    y = x.double() @ (b.double() @ a.double()).T  # (…, in) @ (in, out)
    return y if bias is None else y + bias.double()


def _within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> bool:
    return bool(((got.double() - exact).abs() <= bound).all())


# --- the kernel rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 5), (0,)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("size", [(29, IN), (1031, 1021)], ids=["small", "past ATEN_GEMV_MAX"])
@pytest.mark.parametrize("amx", [False, True], ids=["no AMX", "AMX"])
def test_linear_gives_the_product_on_every_kernel(dtype, lead, with_bias, size, amx, monkeypatch):
    monkeypatch.setattr(lowrank_linear, "has_amx", lambda: amx)  # both rules' kernels, whatever this CPU has
    generator = torch.Generator().manual_seed(2)
    out, n = size
    weight = torch.randn(out, n, generator=generator).to(dtype)
    bias = torch.randn(out, generator=generator).to(dtype) if with_bias else None
    x = torch.randn(*lead, n, generator=generator).to(dtype)
    got = linear(x, weight, bias)
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert got.shape == (*lead, out) and got.dtype == dtype
    assert _within(got, exact, _bound(x, weight, n, bias))
    assert torch.backends.mkldnn.enabled  # the ATen path turns oneDNN off for its call only


@contextlib.contextmanager
def _onednn(enabled: bool):
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled  # (mkldnn.flags() also sets TF32 flags, and warns on a CPU build)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the rule picks among oneDNN and ATen")
@pytest.mark.parametrize("amx", [False, True], ids=["no AMX", "AMX"])
def test_the_rule_for_one_bfloat16_row_is_aten_s_gemv_but_for_a_large_w_with_amx(amx, monkeypatch):
    monkeypatch.setattr(lowrank_linear, "has_amx", lambda: amx)
    small = torch.zeros(8, IN, dtype=torch.bfloat16)
    large = torch.zeros(ATEN_GEMV_MAX // IN + 1, IN, dtype=torch.bfloat16)
    edge = torch.zeros(ATEN_GEMV_MAX // IN, IN, dtype=torch.bfloat16)
    one, rows = torch.zeros(1, 1, IN, dtype=torch.bfloat16), torch.zeros(2, 3, IN, dtype=torch.bfloat16)
    assert kernel_for(one, small) is kernel_for(one, edge) is Kernel.aten_gemv
    # with AMX oneDNN's W·x ran faster for a W past ATEN_GEMV_MAX; without it ATen's gemv at every size
    assert kernel_for(one, large) is (Kernel.onednn_mv if amx else Kernel.aten_gemv)
    for weight in (small, large):
        assert kernel_for(rows, weight) is kernel_for(torch.zeros(2, IN, dtype=torch.bfloat16), weight) is Kernel.linear
        assert kernel_for(one.float(), weight.float()) is kernel_for(one.half(), weight.half()) is Kernel.linear
        with _onednn(False):  # oneDNN turned off by the user: F.linear, ATen's kernel anyway
            assert kernel_for(one, weight) is Kernel.linear


def test_amx_is_read_as_the_cpu_s_flags_say():
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = [set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")]
    if not flags:
        pytest.skip("/proc/cpuinfo lists no flags (not an x86 CPU)")
    assert has_amx() == ("amx_tile" in flags[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 5)], ids=str)
def test_linear_gives_the_product_of_a_weight_stored_by_columns(dtype, lead):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(IN, 29, generator=generator).to(dtype).t()  # (29, IN), its transpose contiguous
    bias = torch.randn(29, generator=generator).to(dtype)
    x = torch.randn(*lead, IN, generator=generator).to(dtype)
    if len(lead) < 2 and torch.backends.mkldnn.is_available():
        assert kernel_for(x, weight) is Kernel.linear  # ATen's gemv is slow by columns: oneDNN's x·Wᵀ
    exact = x.double() @ weight.double().T + bias.double()
    assert _within(linear(x, weight, bias), exact, _bound(x, weight, IN, bias))


def test_the_aten_path_restores_a_user_s_onednn_setting_even_when_the_product_fails():
    w16 = torch.zeros(8, IN, dtype=torch.bfloat16)
    with _onednn(False):
        linear(torch.zeros(1, IN, dtype=torch.bfloat16), w16)
        assert not torch.backends.mkldnn.enabled  # left as the user set it
    with pytest.raises(RuntimeError):
        linear(torch.zeros(1, IN + 1, dtype=torch.bfloat16), w16)  # shapes that do not multiply
    assert torch.backends.mkldnn.enabled


# --- siblings -----------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """q, k and v read one input, as in a transformer's attention; o reads another."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _factors(dtype: torch.dtype, seed: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (out, rank) in SHAPES.items():
        b = torch.randn(out, rank, generator=generator).to(dtype)
        a = torch.randn(rank, IN, generator=generator).to(dtype)
        bias = torch.randn(out, generator=generator).to(dtype) if name != "k" else None
        factors[name] = (b, a, bias)
    return factors


def _attention(factors) -> _Attention:
    return _Attention(
        {name: LowRankLinear.from_factors(b.clone(), a.clone(), None if bias is None else bias.clone())
         for name, (b, a, bias) in factors.items()}
    )  # fmt: skip


class _Products(TorchDispatchMode):
    """How many matrix products run (mm, addmm, mv, bmm)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.mv, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1, 1), (3, 7), (1,), (2, 1)], ids=str)
def test_stacked_siblings_give_the_unfused_and_the_expanded_outputs(dtype, lead):
    factors = _factors(dtype)
    fused, unfused = _attention(factors), _attention(factors)
    assert fuse_siblings(fused) == [["q", "k", "v"]]
    expanded = {name: LowRankLinear.from_factors(b, a, bias).to_linear() for name, (b, a, bias) in factors.items()}
    x = torch.randn(*lead, IN, generator=torch.Generator().manual_seed(4)).to(dtype)
    counter = _Products()
    with torch.no_grad():
        with counter:
            got = fused(x)
        reference = unfused(x)
    assert counter.count == 1 + 3  # one stacked A·x, then each layer's B
    start = 0
    for name, (b, a, bias) in factors.items():
        out = b.shape[0]
        part, want = got[..., start : start + out], reference[..., start : start + out]
        exact, bound = _exact(x, b, a, bias), _factored_bound(x, b, a, bias)
        assert _within(part, exact, bound), name
        assert _within(want, exact, bound), name  # the unfused reference, to the same bound
        with torch.no_grad():
            dense = expanded[name](x)  # the dense Linear with W = B·A rounded to the dtype
        assert _within(dense, exact, bound + _bound(x, b.double() @ a.double(), 0)), name
        start += out


def test_siblings_that_read_different_inputs_stop_sharing_and_stay_right():
    factors = _factors(torch.float32)
    model = _attention(factors)
    fuse_siblings(model)
    generator = torch.Generator().manual_seed(5)
    x_decoder, x_encoder = torch.randn(2, IN, generator=generator), torch.randn(4, IN, generator=generator)
    with torch.no_grad():  # a cross-attention: the query reads the decoder, key and value the encoder
        got = [model.q(x_decoder), model.k(x_encoder), model.v(x_encoder), model.q(x_encoder)]
    for (name, x), y in zip([("q", x_decoder), ("k", x_encoder), ("v", x_encoder), ("q", x_encoder)], got, strict=True):
        b, a, bias = factors[name]
        assert _within(y, _exact(x, b, a, bias), _factored_bound(x, b, a, bias)), name
    assert not model.q.siblings.sharing
    counter = _Products()
    with torch.no_grad(), counter:
        model(x_encoder)
    assert counter.count == 6  # each layer on its own from now on


def test_an_input_changed_in_place_between_siblings_is_multiplied_anew():
    factors = _factors(torch.float32)
    model = _attention(factors)
    fuse_siblings(model)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model.q(x)
        x.mul_(2)
        got = model.k(x)
    b, a, bias = factors["k"]
    assert _within(got, _exact(x, b, a, bias), _factored_bound(x, b, a, bias))


def test_training_gives_every_a_its_own_gradient_and_updates_reach_the_stacked_product():
    factors = _factors(torch.float32)
    fused, unfused = _attention(factors), _attention(factors)
    fuse_siblings(fused)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(7))
    fused(x).square().sum().backward()
    unfused(x).square().sum().backward()
    for name in SHAPES:
        for factor in ("A", "B"):
            got, want = getattr(getattr(fused, name), factor).grad, getattr(getattr(unfused, name), factor).grad
            assert got is not None and torch.allclose(got, want, rtol=1e-5, atol=1e-5), (name, factor)
    with torch.no_grad():  # an optimizer's step writes into the A's, so into the stacked tensor they view
        for model in (fused, unfused):
            for name in SHAPES:
                getattr(model, name).A.sub_(0.1 * getattr(model, name).A.grad)
        assert torch.allclose(fused(x), unfused(x), rtol=1e-5, atol=1e-5)


def test_a_model_moved_with_to_falls_back_and_fusing_again_stacks_the_moved_factors():
    factors = _factors(torch.float32)
    model = _attention(factors)
    fuse_siblings(model)
    model.to(torch.float64)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    exact = torch.cat([_exact(x, b, a, bias) for b, a, bias in factors.values()], dim=-1)
    counter = _Products()
    with torch.no_grad(), counter:
        got = model(x)
    assert counter.count == 6 and got.dtype == torch.float64  # the A's moved: each layer on its own
    assert torch.allclose(got, exact, rtol=1e-12, atol=1e-12)
    fuse_siblings(model)
    counter = _Products()
    with torch.no_grad(), counter:
        again = model(x)
    assert counter.count == 4 and torch.allclose(again, exact, rtol=1e-12, atol=1e-12)


def test_only_named_siblings_with_their_own_a_are_stacked():
    factors = _factors(torch.float32)
    layers = {name: LowRankLinear.from_factors(b, a, bias) for name, (b, a, bias) in factors.items()}
    layers["o"] = LowRankLinear.from_factors(*factors["q"][:2])  # reads another input: not a sibling
    layers["v"].A = layers["o"].A  # tied to o's: left alone, or o would lose its tie
    model = _Attention(layers)
    assert fuse_siblings(model) == [["q", "k"]]
    assert layers["v"].siblings is None and layers["o"].siblings is None and layers["v"].A is layers["o"].A
    assert isinstance(layers["q"].siblings, Siblings) and layers["q"].siblings is layers["k"].siblings


def _by_columns(tensor: torch.Tensor) -> bool:
    return tensor.stride() == (1, tensor.shape[0])


def test_lay_out_factors_stores_float32_b_by_columns_and_other_dtypes_by_rows_with_the_same_products():
    factors = _factors(torch.float32)
    model = _attention(factors)
    model.o = LowRankLinear.from_factors(torch.randn(23, 5), torch.randn(5, 19))
    model.o.B = model.q.B  # tied: left as it is, or the tie would break
    assert lay_out_factors(model) == 2 and lay_out_factors(model) == 0  # once; then nothing to do
    assert _by_columns(model.k.B) and _by_columns(model.v.B) and model.q.B.is_contiguous()
    assert model.o.B is model.q.B
    for name, (b, _, _) in factors.items():
        assert torch.equal(getattr(model, name).B, b), name  # the order changes, never a value
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)  # keeps float32's order: the bfloat16 rule then avoids ATen's gemv
        for lead in ((1,), (3, 7)):
            x = torch.randn(*lead, IN, generator=torch.Generator().manual_seed(6)).to(dtype)
            with torch.no_grad():
                got = model(x)
            start = 0
            for name, (b, a, bias) in factors.items():
                b, a, bias = b.to(dtype), a.to(dtype), None if bias is None else bias.to(dtype)
                part = got[..., start : start + b.shape[0]]
                assert _within(part, _exact(x, b, a, bias), _factored_bound(x, b, a, bias)), (dtype, lead, name)
                start += b.shape[0]
    assert _by_columns(model.k.B) and model.k.B.dtype == torch.bfloat16
    assert lay_out_factors(model) == 2 and model.k.B.is_contiguous() and model.v.B.is_contiguous()


# --- load_pretrained --------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
LLAMA = dict(
    vocab_size=101, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama, its decoder compressed at rank 7, and the dense model expand gives back."""
    tmp = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval().save_pretrained(tmp / "dense")
    out = tmp / "small"
    out.mkdir()
    shutil.copy(tmp / "dense" / "config.json", out / "config.json")
    cli_json("compress", tmp / "dense" / "model.safetensors", "--rank", "7", "--include", "model.layers.*",
             "-o", out / "model.safetensors")  # fmt: skip
    expanded = tmp / "expanded"
    expanded.mkdir()
    shutil.copy(tmp / "dense" / "config.json", expanded / "config.json")
    cli_json("expand", out / "model.safetensors", "-o", expanded / "model.safetensors")
    return out, expanded


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_pretrained_stacks_q_k_v_and_gate_up_and_gives_the_expanded_model_s_logits(llama, dtype):
    out, expanded = llama
    fused, unfused = load_pretrained(out, dtype=dtype), load_pretrained(out, dtype=dtype, fuse=False)
    dense = transformers.LlamaForCausalLM.from_pretrained(expanded, dtype=dtype).eval()
    exact = transformers.LlamaForCausalLM.from_pretrained(expanded, dtype=torch.float64).eval()
    layer = fused.model.layers[0]
    assert layer.self_attn.q_proj.siblings is layer.self_attn.v_proj.siblings is not None
    assert layer.mlp.gate_proj.siblings is layer.mlp.up_proj.siblings is not None
    assert layer.mlp.down_proj.siblings is None and unfused.model.layers[0].self_attn.q_proj.siblings is None
    assert list(fused.state_dict()) == list(unfused.state_dict())  # the same names, for saving and training
    assert _by_columns(layer.mlp.down_proj.B) == (dtype == torch.float32)  # lay_out_factors' rule
    assert unfused.model.layers[0].mlp.down_proj.B.is_contiguous()
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for batch in (ids, ids[:1, :1]):  # a prefill, and one row (a decode step's shape)
            want = exact(batch).logits
            allowed = (dense(batch).logits.double() - want).abs().max()  # the expanded model's own rounding
            allowed = 2 * allowed + torch.finfo(dtype).eps * want.abs().max()
            for model in (fused, unfused):
                assert (model(batch).logits.double() - want).abs().max() <= allowed


def test_a_fused_model_saves_the_factors_it_loaded(llama, tmp_path):
    out, _ = llama
    from safetensors.torch import load_file

    model = load_pretrained(out)
    saved = save_factors(model, tmp_path / "again.safetensors")
    original, again = load_file(out / "model.safetensors"), load_file(saved)
    assert set(original) == set(again)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
