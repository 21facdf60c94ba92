"""Running the factors: LowRankLinear, apply_factors, load_pretrained, save_factors.

Tiny models are built from configs (no downloads). Expected outputs come from the dense model
that `lowrank expand` rebuilds, loaded by transformers itself, or from float64 maths on the
factors read straight from the file; never from lowrank_cli.nn's own output.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
from collections import OrderedDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import by_name, cli_json, file_metadata, load, low_rank, save, singular_values, tail_errors  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lowrank_cli.errors import CheckpointError, LowrankError, MissingExtraError, UsageError  # noqa: E402
from lowrank_cli.nn import (  # noqa: E402
    LoadResult,
    LowRankEmbedding,
    LowRankLinear,
    apply_factors,
    load_pretrained,
    save_factors,
)

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

# Distinct sizes, so that no tensor read while loading has the shape of a dense factorized weight.
BERT = BertConfig(
    vocab_size=120,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=80,
    max_position_embeddings=40,
)
GPT2 = GPT2Config(vocab_size=120, n_embd=48, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0)
TOKENS = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
RANK = 8


def _saved(tmp_path, model: nn.Module, name: str = "src"):
    torch.manual_seed(0)
    folder = tmp_path / name
    model.eval().save_pretrained(folder)
    return folder


def _compressed(tmp_path, source, *policy: object) -> tuple[object, dict]:
    """Compress the folder's weights into out/model.safetensors beside a copy of its config.json."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    report = cli_json("compress", source / "model.safetensors", *policy, "-o", out / "model.safetensors")
    return out, report


def _expanded(tmp_path, compressed, model_class):
    """The reference: lowrank expand, then transformers' own from_pretrained."""
    folder = tmp_path / "expanded"
    folder.mkdir()
    shutil.copy(compressed / "config.json", folder / "config.json")
    cli_json("expand", compressed / "model.safetensors", "-o", folder / "model.safetensors")
    return model_class.from_pretrained(folder).eval()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rtol * scale, ((actual - expected).abs().max(), scale)


def _unique_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


# --- LowRankLinear --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_linear_matches_linear_with_the_product_weight(dtype):
    generator = torch.Generator().manual_seed(1)
    n_in, n_out, rank = 96, 40, 12
    b = torch.randn(n_out, rank, generator=generator).to(dtype)
    a = torch.randn(rank, n_in, generator=generator).to(dtype)
    bias = torch.randn(n_out, generator=generator).to(dtype)
    x = torch.randn(5, 7, n_in, generator=generator).to(dtype)
    layer = LowRankLinear.from_factors(b, a, bias)
    dense = nn.Linear(n_in, n_out).to(dtype)
    with torch.no_grad():
        dense.weight.copy_((b.double() @ a.double()).to(dtype))  # (out, r) @ (r, in) -> (out, in)
        dense.bias.copy_(bias)
        got, linear = layer(x), dense(x)
    assert got.dtype == dtype and got.shape == (5, 7, n_out)
    # Float64 reference and a rounding bound: sums of n_in + rank products, each rounded at eps,
    # plus the rounding of A·x and of W to `dtype`.
    x64, b64, a64 = x.double(), b.double(), a.double()
    exact = x64 @ (b64 @ a64).T + bias.double()
    magnitude = x64.abs() @ (b64.abs() @ a64.abs()).T + bias.double().abs()
    eps = torch.finfo(dtype).eps
    bound = (n_in + rank + 4) * eps * magnitude
    assert bool(((got.double() - exact).abs() <= bound).all())
    assert bool(((linear.double() - exact).abs() <= bound).all())


def test_a_new_low_rank_linear_is_initialised_with_nn_linear_s_variance():
    torch.manual_seed(3)
    n_in, n_out, rank = 512, 384, 64
    layer = LowRankLinear(n_in, n_out, rank)
    a, b, bias = layer.A.detach().double(), layer.B.detach().double(), layer.bias.detach().double()
    assert a.abs().max() <= 1 / math.sqrt(n_in) and b.abs().max() <= math.sqrt(3 / rank)
    assert bias.abs().max() <= 1 / math.sqrt(n_in) and bias.std() > 0
    w = b @ a  # (out, r) @ (r, in) -> (out, in)
    # nn.Linear: kaiming_uniform(a=√5) gives U(−1/√in, 1/√in), whose variance is 1/(3·in)
    assert w.var().item() == pytest.approx(1 / (3 * n_in), rel=0.05)
    assert abs(w.mean().item()) < 0.05 * w.std().item()
    torch.manual_seed(3)
    again = LowRankLinear(n_in, n_out, rank)
    assert torch.equal(again.A, layer.A) and torch.equal(again.B, layer.B)  # seeded like any torch layer


def test_a_new_low_rank_embedding_is_initialised_with_nn_embedding_s_variance():
    torch.manual_seed(4)
    table = LowRankEmbedding(2000, 256, 32, padding_idx=-1)
    e = table.B.detach().double() @ table.A.detach().double()  # (num, r) @ (r, dim) -> (num, dim)
    assert table.padding_idx == 1999 and not e[1999].any()  # nn.Embedding's: -1 is the last row, kept at zero
    assert e[:1999].var().item() == pytest.approx(1.0, rel=0.05)  # nn.Embedding draws N(0, 1)
    ids = torch.tensor([[3, 1999, 7]])
    assert torch.allclose(table(ids).double(), e[ids], rtol=0, atol=1e-5 * e.abs().max().item())
    with pytest.raises(LowrankError, match="padding_idx 2000 is not a row of a 2000-row table"):
        LowRankEmbedding(2000, 256, 32, padding_idx=2000)


@pytest.mark.parametrize("layer_class", [LowRankLinear, LowRankEmbedding])
def test_the_low_rank_layers_take_their_arguments_alike(layer_class):
    """Each takes the sizes of the torch layer it replaces, then rank, then that layer's option, then
    keyword-only device and dtype; from_factors takes B, A, the option, and keyword-only rel_error."""
    torch_layer = {LowRankLinear: nn.Linear, LowRankEmbedding: nn.Embedding}[layer_class]
    option = {LowRankLinear: "bias", LowRankEmbedding: "padding_idx"}[layer_class]
    sizes = list(inspect.signature(torch_layer).parameters)[:2]
    parameters = inspect.signature(layer_class).parameters
    assert list(parameters) == [*sizes, "rank", option, "device", "dtype"]
    assert [p.kind for p in parameters.values()][-2:] == [inspect.Parameter.KEYWORD_ONLY] * 2
    assert list(inspect.signature(layer_class.from_factors).parameters) == ["b", "a", option, "rel_error"]
    layer = layer_class(6, 5, 2, device="meta", dtype=torch.float64)
    # Linear(in 6, out 5): A (r, in), B (out, r); Embedding(num 6, dim 5): A (r, dim), B (num, r)
    expected = ((2, 6), (5, 2)) if layer_class is LowRankLinear else ((2, 5), (6, 2))
    assert (layer.A.shape, layer.B.shape) == expected
    assert layer.A.dtype == layer.B.dtype == torch.float64 and layer.A.is_meta


def test_from_linear_error_is_the_best_rank_r_error_and_to_linear_is_the_product():
    torch.manual_seed(2)
    linear = nn.Linear(30, 20)
    with torch.no_grad():
        linear.weight.copy_(low_rank(20, 30, 20, seed=3))
    layer = LowRankLinear.from_linear(linear, rank=6)
    expected = tail_errors(singular_values(linear.weight.detach()))[6]
    assert layer.rank == 6 and layer.A.shape == (6, 30) and layer.B.shape == (20, 6)
    assert layer.rel_error == pytest.approx(expected, rel=1e-4)
    dense = layer.to_linear()
    np.testing.assert_allclose(
        dense.weight.detach().double().numpy(),
        layer.B.detach().double().numpy() @ layer.A.detach().double().numpy(),
        rtol=1e-6,
        atol=1e-6,
    )
    assert torch.equal(dense.bias, linear.bias)
    x = torch.randn(4, 30)
    _assert_close(layer(x).detach(), dense(x).detach(), rtol=1e-5)


def test_from_linear_refuses_a_conv_kernel_with_a_clear_message():
    with pytest.raises(LowrankError, match="Conv2d is not an nn.Linear"):
        LowRankLinear.from_linear(nn.Conv2d(3, 8, 3), rank=2)


def test_from_linear_on_a_gpt2_conv1d_computes_the_same_function():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    conv = Conv1D(24, 16)  # nf = out, nx = in; weight (in, out)
    layer = LowRankLinear.from_linear(conv, rank=16)  # full rank: the same function
    x = torch.randn(3, 16)
    _assert_close(layer(x).detach(), conv(x).detach(), rtol=1e-5)
    assert layer.transposed


# --- load_pretrained ------------------------------------------------------------------------------


def test_load_pretrained_matches_expand_then_from_pretrained(tmp_path):
    torch.manual_seed(0)
    source = _saved(tmp_path, BertModel(BERT))
    out, report = _compressed(tmp_path, source, "--rank", RANK)
    factorized = [t["name"] for t in report["tensors"] if t["status"] == "factorized"]
    assert "embeddings.word_embeddings.weight" in factorized and len(factorized) >= 13

    model = load_pretrained(out)
    reference = _expanded(tmp_path, out, BertModel)
    with torch.no_grad():
        _assert_close(model(TOKENS).last_hidden_state, reference(TOKENS).last_hidden_state)
    assert not model.training
    assert _unique_numel(model) == report["totals"]["params_after"]
    low_rank_names = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, LowRankLinear | LowRankEmbedding)
    }
    assert low_rank_names == set(factorized)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_load_pretrained_with_energy_policy_and_weights_elsewhere(tmp_path):
    torch.manual_seed(0)
    source = _saved(tmp_path, BertModel(BERT))
    weights = tmp_path / "elsewhere.safetensors"
    cli_json("compress", source / "model.safetensors", "--energy", "0.9", "-o", weights)
    model = load_pretrained(source, weights=weights)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(weights, out / "model.safetensors")
    shutil.copy(source / "config.json", out / "config.json")
    reference = _expanded(tmp_path, out, BertModel)
    with torch.no_grad():
        _assert_close(model(TOKENS).last_hidden_state, reference(TOKENS).last_hidden_state)


def test_gpt2_conv1d_and_tied_lm_head_share_the_factors(tmp_path):
    torch.manual_seed(0)
    source = _saved(tmp_path, GPT2LMHeadModel(GPT2))
    out, report = _compressed(tmp_path, source, "--rank", RANK)
    assert by_name(report)["transformer.wte.weight"]["status"] == "factorized"
    model = load_pretrained(out)
    assert isinstance(model.lm_head, LowRankLinear) and model.lm_head.B is model.transformer.wte.B
    reference = _expanded(tmp_path, out, GPT2LMHeadModel)
    with torch.no_grad():
        _assert_close(model(TOKENS).logits, reference(TOKENS).logits)


class _Allocations(TorchDispatchMode):
    """The largest tensor any operation produces off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self.largest = max(self.largest, tensor.numel())
        return result


def test_loading_never_allocates_a_dense_factorized_weight(tmp_path):
    torch.manual_seed(0)
    source = _saved(tmp_path, BertModel(BERT))
    out, report = _compressed(tmp_path, source, "--rank", RANK)
    smallest_dense = min(t["params"] for t in report["tensors"] if t["status"] == "factorized")
    tracker = _Allocations()
    with tracker:
        model = load_pretrained(out)
    assert tracker.largest > 0  # the mode saw the loader's tensors
    assert tracker.largest < smallest_dense, (tracker.largest, smallest_dense)
    assert isinstance(model.embeddings.word_embeddings, LowRankEmbedding)


def test_load_pretrained_refuses_a_file_that_lacks_the_model_s_tensors(tmp_path):
    torch.manual_seed(0)
    source = _saved(tmp_path, BertModel(BERT))
    out, _ = _compressed(tmp_path, source, "--rank", RANK)
    missing = r"2 of the model's are not in the file \('classifier\.weight', 'classifier\.bias'\)"
    with pytest.raises(CheckpointError, match=missing) as caught:
        load_pretrained(out, BertForSequenceClassification)
    assert "\n" not in str(caught.value) and "strict=False" in str(caught.value)


def test_load_pretrained_not_strict_initialises_a_new_head_as_transformers_does(tmp_path):
    torch.manual_seed(0)
    source = _saved(tmp_path, BertModel(BERT))
    out, _ = _compressed(tmp_path, source, "--rank", RANK)
    model, info = load_pretrained(out, BertForSequenceClassification, strict=False, output_loading_info=True)
    assert info == LoadResult(missing_keys=["classifier.weight", "classifier.bias"], unexpected_keys=[])
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    # BertPreTrainedModel._init_weights: Linear weights N(0, initializer_range), biases 0
    assert weight.std().item() == pytest.approx(BERT.initializer_range, rel=0.3) and not bias.any()
    reference = _expanded(tmp_path, out, BertModel)
    with torch.no_grad():
        _assert_close(model.bert(TOKENS).last_hidden_state, reference(TOKENS).last_hidden_state)


def test_load_pretrained_needs_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_pretrained(tmp_path)


# --- apply_factors --------------------------------------------------------------------------------


def test_apply_factors_adds_the_base_model_prefix_for_a_task_head_model(tmp_path):
    torch.manual_seed(0)
    source = _saved(tmp_path, BertModel(BERT))
    out, _ = _compressed(tmp_path, source, "--rank", RANK)
    torch.manual_seed(5)
    model = BertForSequenceClassification(BERT).eval()
    classifier = model.classifier.weight.detach().clone()
    result = apply_factors(model, out / "model.safetensors", strict=False)
    assert result == LoadResult(missing_keys=["classifier.weight", "classifier.bias"], unexpected_keys=[])
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LowRankLinear)
    assert torch.equal(model.classifier.weight, classifier)  # not in the file: kept
    reference = _expanded(tmp_path, out, BertModel)
    with torch.no_grad():
        _assert_close(model.bert(TOKENS).last_hidden_state, reference(TOKENS).last_hidden_state)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (BertConfig.from_dict({**BERT.to_dict(), "hidden_size": 64}), r"is \[\d+, 48\] but the model's"),
        (
            GPT2,
            r"does not fit GPT2LMHeadModel: \d+ of its tensors are not in the model \('embeddings\.[^']+',.*"
            r" and \d+ of the model's are not in the file \('transformer\.",
        ),
    ],
)
def test_apply_factors_on_a_mismatched_file_leaves_the_model_unchanged(tmp_path, config, message):
    torch.manual_seed(0)
    source = _saved(tmp_path, BertModel(BERT))
    out, _ = _compressed(tmp_path, source, "--rank", RANK)
    torch.manual_seed(6)
    model = (BertModel if isinstance(config, BertConfig) else GPT2LMHeadModel)(config).eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(CheckpointError, match=message) as caught:
        apply_factors(model, out / "model.safetensors")
    assert "\n" not in str(caught.value) and "model.safetensors" in str(caught.value)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert [type(m) for m in model.modules()] == modules_before


def test_apply_factors_reports_missing_and_unexpected_names_like_load_state_dict(tmp_path):
    torch.manual_seed(9)
    source = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 56))
    save(tmp_path / "mlp.safetensors", dict(source.state_dict()))
    cli_json("compress", tmp_path / "mlp.safetensors", "--rank", 4, "-o", tmp_path / "c.safetensors")
    # the same first layer; a last layer under another name and of another size
    model = nn.Sequential(OrderedDict([("0", nn.Linear(64, 48)), ("1", nn.ReLU()), ("3", nn.Linear(48, 8))]))
    before = {name: t.clone() for name, t in model.state_dict().items()}

    with pytest.raises(CheckpointError) as caught:
        apply_factors(model, tmp_path / "c.safetensors")
    assert str(caught.value) == (
        f"{tmp_path / 'c.safetensors'}: does not fit Sequential: 2 of its tensors are not in the model"
        " ('2.weight', '2.bias') and 2 of the model's are not in the file ('3.weight', '3.bias'); names must"
        " match exactly; load it into the model it was saved from, or pass strict=False to load what matches"
    )
    assert all(torch.equal(model.state_dict()[name], before[name]) for name in before)  # strict: untouched

    result = apply_factors(model, tmp_path / "c.safetensors", strict=False)
    assert result == LoadResult(missing_keys=["3.weight", "3.bias"], unexpected_keys=["2.weight", "2.bias"])
    assert result.missing_keys == result[0]  # a named tuple, as torch's
    last = model.get_submodule("3")
    assert isinstance(model[0], LowRankLinear) and isinstance(last, nn.Linear)
    assert torch.equal(last.weight, before["3.weight"])  # kept
    stored = load(tmp_path / "c.safetensors")
    w0 = stored["0.weight.B"].double() @ stored["0.weight.A"].double()  # (48, 4) @ (4, 64) -> (48, 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        _assert_close(model[0](x).double(), x.double() @ w0.T + stored["0.bias"].double(), rtol=1e-5)


def test_a_second_apply_factors_says_the_model_is_already_factored(tmp_path):
    """Not 'does not fit' with a list of names and strict=False: its layers are factors already."""
    torch.manual_seed(10)
    source = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 56))
    save(tmp_path / "mlp.safetensors", dict(source.state_dict()))
    cli_json("compress", tmp_path / "mlp.safetensors", "--rank", 4, "-o", tmp_path / "c.safetensors")
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 56))
    apply_factors(model, tmp_path / "c.safetensors")
    factors = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(UsageError, match=r"already factored \(2 low-rank layers, first '0'\)"):
        apply_factors(model, tmp_path / "c.safetensors")
    assert all(torch.equal(model.state_dict()[name], factors[name]) for name in factors)  # untouched


def test_apply_factors_refuses_a_conv_kernel(tmp_path):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 40))
    save(tmp_path / "conv.safetensors", dict(model.state_dict()))
    cli_json("compress", tmp_path / "conv.safetensors", "--rank", 2, "-o", tmp_path / "c.safetensors")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tensor '0\.weight' is a conv kernel.*exclude=\['0\.weight'\]"):
        apply_factors(model, tmp_path / "c.safetensors")
    assert all(torch.equal(model.state_dict()[name], before[name]) for name in before)


def test_without_transformers_load_pretrained_says_how_to_install_and_apply_factors_works(tmp_path, monkeypatch):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 56))
    save(tmp_path / "mlp.safetensors", dict(model.state_dict()))
    cli_json("compress", tmp_path / "mlp.safetensors", "--rank", 4, "-o", tmp_path / "c.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.setitem(sys.modules, "transformers", None)

    with pytest.raises(
        MissingExtraError, match=r"^load_pretrained needs transformers.*pip install 'lowrank\[calibrate\]'$"
    ) as caught:
        load_pretrained(tmp_path, weights=tmp_path / "c.safetensors")
    assert "\n" not in str(caught.value)

    apply_factors(model, tmp_path / "c.safetensors")
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    # float64 maths on the file's own factors
    stored = load(tmp_path / "c.safetensors")
    w0 = stored["0.weight.B"].double() @ stored["0.weight.A"].double()  # (48, 4) @ (4, 64) -> (48, 64)
    w2 = stored["2.weight.B"].double() @ stored["2.weight.A"].double()
    x = torch.randn(3, 64)
    expected = torch.relu(x.double() @ w0.T + stored["0.bias"].double()) @ w2.T + stored["2.bias"].double()
    with torch.no_grad():
        _assert_close(model(x).double(), expected, rtol=1e-5)


# --- save_factors ---------------------------------------------------------------------------------


def test_save_factors_round_trips_through_expand(tmp_path):
    torch.manual_seed(0)
    source = _saved(tmp_path, GPT2LMHeadModel(GPT2))
    out, _ = _compressed(tmp_path, source, "--rank", RANK)
    model = load_pretrained(out)
    saved = save_factors(model, tmp_path / "again")
    assert saved == tmp_path / "again" / "model.lowrank.safetensors"  # a name from_pretrained does not load
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "README.md",
        "config.json",
        "model.lowrank.safetensors",
    ]

    original = json.loads(file_metadata(out / "model.safetensors")["lowrank"])["tensors"]
    written = json.loads(file_metadata(saved)["lowrank"])["tensors"]
    assert written == original  # shape, dtype, rank, rel_error and split of every factorized tensor
    cli_json("expand", out / "model.safetensors", "-o", tmp_path / "first.safetensors")
    cli_json("expand", saved, "-o", tmp_path / "second.safetensors")
    first, second = load(tmp_path / "first.safetensors"), load(tmp_path / "second.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    ranks=st.lists(st.integers(1, 12), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_save_factors_then_apply_factors_gives_the_same_function(tmp_path_factory, sizes, ranks, seed):
    torch.manual_seed(seed)
    layers = [nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes, sizes[1:], strict=False)]
    factored = nn.Sequential(
        *(LowRankLinear.from_linear(layer, rank=rank) for layer, rank in zip(layers, ranks, strict=False))
    )
    path = save_factors(factored, tmp_path_factory.mktemp("saved") / "model.safetensors")
    dense = nn.Sequential(*(nn.Linear(layer.in_features, layer.out_features) for layer in layers))
    apply_factors(dense, path)
    x = torch.randn(3, sizes[0], dtype=torch.float64)
    expected = x
    for layer in factored:  # float64 maths on the factors that were saved
        expected = expected @ (layer.B.detach().double() @ layer.A.detach().double()).T + layer.bias.detach().double()
    assert all(isinstance(layer, LowRankLinear) for layer in dense)
    with torch.no_grad():
        np.testing.assert_allclose(dense(x.float()).double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_nn_imports_transformers_only_inside_functions():
    """transformers is an optional extra (the layers' import direction is test_api's)."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "lowrank_cli" / "nn"
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
        top_level += [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module]
        assert not any(name.split(".")[0] == "transformers" for name in top_level), f"{path.name}: imports transformers"


def test_load_pretrained_reads_the_folder_compress_writes_for_a_sharded_model(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "sharded"
    BertModel(BERT).eval().save_pretrained(source, max_shard_size="40KB")
    assert len(list(source.glob("*.safetensors"))) > 1
    out = tmp_path / "sharded.lowrank"
    cli_json("compress", source, "--rank", RANK, "-o", out)
    assert (out / "config.json").is_file()  # compress copies the folder's other files
    model = load_pretrained(out)
    dense = tmp_path / "dense"
    cli_json("expand", out, "-o", dense)
    reference = BertModel.from_pretrained(dense).eval()
    with torch.no_grad():
        _assert_close(model(TOKENS).last_hidden_state, reference(TOKENS).last_hidden_state)


def test_from_linear_splits_float16_factors_that_would_overflow():
    """σ_max of a 256×256 weight of 300s is 76,800 > float16's 65,504: B = U·S would be Inf, B = U·√S is not."""
    linear = nn.Linear(256, 256, bias=False).half()
    with torch.no_grad():
        linear.weight.fill_(300.0)
    layer = LowRankLinear.from_linear(linear, rank=1)
    assert bool(torch.isfinite(layer.B).all() and torch.isfinite(layer.A).all())
    product = layer.B.float() @ layer.A.float()  # (256, 1) @ (1, 256)
    assert torch.allclose(product, torch.full((256, 256), 300.0), rtol=2 * torch.finfo(torch.float16).eps)


def test_from_linear_refuses_a_weight_with_nan():
    linear = nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight[2, 3] = float("nan")
    with pytest.raises(LowrankError, match="Linear weight contains NaN"):
        LowRankLinear.from_linear(linear, rank=2)


# --- a compressed folder and transformers' own loader -------------------------------------------------


@pytest.mark.parametrize("shard", [False, True], ids=["one file", "shards"])
def test_transformers_refuses_a_compressed_folder_and_loads_the_expanded_one(tmp_path, shard):
    """from_pretrained would load a compressed folder with every factorized weight random: it must fail."""
    torch.manual_seed(0)
    source = tmp_path / "bert"
    BertModel(BERT).eval().save_pretrained(source, **({"max_shard_size": "40KB"} if shard else {}))
    original_names = sorted(p.name for p in source.iterdir())
    compressed, dense = tmp_path / "bert.lowrank", tmp_path / "bert.dense"
    cli_json("compress", source, "--rank", RANK, "-o", compressed)

    weights = sorted(p.name for p in compressed.iterdir() if p.name not in ("config.json", "README.md"))
    expected = [
        name.replace(".safetensors", ".lowrank.safetensors") for name in original_names if name != "config.json"
    ]
    assert weights == sorted(expected)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.AutoModel.from_pretrained(compressed)
    readme = (compressed / "README.md").read_text(encoding="utf-8")
    assert "lowrank-compressed model" in readme
    assert 'lowrank_cli.load_pretrained("bert.lowrank")' in readme and "lowrank expand bert.lowrank" in readme

    # load_pretrained runs the factors: the model whose weights are W = B·A, computed here from the file
    reference = BertModel.from_pretrained(source).eval()
    state = {}
    for name in weights:
        if name.endswith(".safetensors"):
            state.update(load(compressed / name))
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if f"{name}.B" in state:
                parameter.copy_(state[f"{name}.B"].double() @ state[f"{name}.A"].double())
    model = load_pretrained(compressed)
    assert any(isinstance(module, LowRankLinear) for module in model.modules())
    with torch.no_grad():
        _assert_close(model(TOKENS).last_hidden_state, reference(TOKENS).last_hidden_state)

    cli_json("expand", compressed, "-o", dense)
    assert sorted(p.name for p in dense.iterdir()) == original_names  # the original names, and no README
    expanded = transformers.AutoModel.from_pretrained(dense).eval()
    with torch.no_grad():
        _assert_close(expanded(TOKENS).last_hidden_state, reference(TOKENS).last_hidden_state)


def test_the_original_model_card_travels_with_the_compressed_folder_and_back(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "bert"
    BertModel(BERT).eval().save_pretrained(source)
    card = "---\nlicense: mit\n---\n# My BERT\n"
    (source / "README.md").write_text(card, encoding="utf-8")
    cli_json("compress", source, "--rank", RANK, "-o", tmp_path / "c")
    readme = (tmp_path / "c" / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("<!-- lowrank: a compressed model -->") and readme.endswith(card)
    cli_json("expand", tmp_path / "c", "-o", tmp_path / "d")
    assert (tmp_path / "d" / "README.md").read_text(encoding="utf-8") == card


def test_a_folder_compressed_before_the_lowrank_names_still_loads(tmp_path):
    """Folders written with plain names (model.safetensors) by earlier versions load and expand as before."""
    torch.manual_seed(0)
    source = _saved(tmp_path, BertModel(BERT))
    out, _ = _compressed(tmp_path, source, "--rank", RANK)  # out/model.safetensors, the old layout
    model = load_pretrained(out)
    cli_json("expand", out, "-o", tmp_path / "dense")
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == ["config.json", "model.safetensors"]
    reference = BertModel.from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        _assert_close(model(TOKENS).last_hidden_state, reference(TOKENS).last_hidden_state)
