"""`lowrank extract` against the real client: the adapters load in PEFT and reproduce the fine-tune.

Tiny models are built from configs (no downloads); expected logits and weights come from the
tuned models themselves, never from lowrank's output.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import (  # noqa: E402
    by_name,
    cli_json,
    energy_rank,
    load,
    low_rank,
    save,
    singular_values,
    with_spectrum,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

LLAMA = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TOKENS = torch.randint(0, LLAMA.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
ATOL = 1e-4


def llama(state: dict[str, torch.Tensor] | None = None) -> LlamaForCausalLM:
    """The tiny Llama: seeded random weights, or `state`'s."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LLAMA).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}


@torch.no_grad()
def outputs(model: torch.nn.Module, inputs: torch.Tensor = TOKENS) -> torch.Tensor:
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def fine_tune(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` with ΔW added to each `module` of `deltas` ({module: ΔW})."""
    tuned = dict(base)
    for module, delta in deltas.items():
        weight = base[f"{module}.weight"]
        tuned[f"{module}.weight"] = weight + delta.reshape(weight.shape).to(weight.dtype)
    return tuned


def write_pair(tmp_path, base, tuned):
    return save(tmp_path / "base.safetensors", base), save(tmp_path / "tuned.safetensors", tuned)


def read_config(adapter) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))


def extracted_ranks(report: dict) -> dict[str, int]:
    """{module: rank} of what the report says went into the adapter."""
    return {t["name"].removesuffix(".weight"): t["rank"] for t in report["tensors"] if t["status"] == "extracted"}


def effective(config: dict, module: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT gives `module`: its pattern entry, else the config's default."""
    return config["rank_pattern"].get(module, config["r"]), config["alpha_pattern"].get(module, config["lora_alpha"])


def lora_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    """{module name in the base model: PEFT's LoRA layer}."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module
        for name, module in model.named_modules()
        if hasattr(module, "scaling") and "default" in getattr(module, "r", {})
    }


def assert_loaded_ranks(model: PeftModel, ranks: dict[str, int]) -> None:
    """PEFT built exactly these LoRA layers, each with its rank and scaling exactly 1."""
    layers = lora_layers(model)
    assert sorted(layers) == sorted(ranks)
    for module, layer in layers.items():
        assert layer.r["default"] == ranks[module], module
        assert layer.scaling["default"] == 1.0, module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64))


@pytest.fixture(scope="module")
def base_weights() -> dict[str, torch.Tensor]:
    return weights(llama())


# --- rank-4 deltas at --rank 4 --------------------------------------------------------------------


CHANGED = {  # module -> seed of its rank-4 ΔW
    "model.layers.0.self_attn.q_proj": 1,
    "model.layers.1.self_attn.v_proj": 2,
    "model.layers.0.mlp.down_proj": 3,
    "model.layers.1.mlp.down_proj": 4,
}


def test_adapter_reproduces_the_tuned_model(tmp_path, base_weights):
    deltas = {m: 0.01 * low_rank(*base_weights[f"{m}.weight"].shape, 4, seed=s) for m, s in CHANGED.items()}
    tuned = fine_tune(base_weights, deltas)
    base_file, tuned_file = write_pair(tmp_path, base_weights, tuned)
    adapter = tmp_path / "adapter"

    report = cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 4, "--base-model", "tiny/llama")
    assert extracted_ranks(report) == dict.fromkeys(CHANGED, 4)

    config = read_config(adapter)
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "tiny/llama"
    assert sorted(config["target_modules"]) == sorted(CHANGED)
    assert (config["r"], config["lora_alpha"]) == (4, 4)
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    factors = load(adapter / "adapter_model.safetensors")
    assert set(factors) == {f"base_model.model.{m}.lora_{ab}.weight" for m in CHANGED for ab in "AB"}

    tuned_logits = outputs(llama(tuned))
    assert (outputs(llama(base_weights)) - tuned_logits).abs().max() > 100 * ATOL  # the fine-tune shows
    model = PeftModel.from_pretrained(llama(base_weights), str(adapter)).eval()
    assert_loaded_ranks(model, dict.fromkeys(CHANGED, 4))
    torch.testing.assert_close(outputs(model), tuned_logits, atol=ATOL, rtol=0)

    merged = weights(model.merge_and_unload())
    for name, weight in tuned.items():
        torch.testing.assert_close(merged[name], weight, atol=1e-6, rtol=0)


# --- a LoRA made by PEFT itself -------------------------------------------------------------------


def test_a_peft_lora_is_recovered(tmp_path, base_weights):
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(llama(base_weights), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the LoRA do something
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    merged = weights(model.merge_and_unload())
    modules = sorted(
        name.removesuffix(".weight") for name in merged if name.endswith(tuple(f"{t}.weight" for t in targets))
    )
    assert len(modules) == 6
    base_file, tuned_file = write_pair(tmp_path, base_weights, merged)
    adapter = tmp_path / "adapter"

    report = cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", 8)
    assert extracted_ranks(report) == dict.fromkeys(modules, 8)
    assert sorted(read_config(adapter)["target_modules"]) == modules

    recovered = PeftModel.from_pretrained(llama(base_weights), str(adapter)).eval()
    assert_loaded_ranks(recovered, dict.fromkeys(modules, 8))
    rebuilt = weights(recovered.merge_and_unload())
    assert sorted(rebuilt) == sorted(merged)
    for name, weight in merged.items():
        assert rel(rebuilt[name], weight) <= 1e-5, name


# --- per-module ranks: --energy and --budget ------------------------------------------------------


SPECTRA = {  # module -> σ of its ΔW: ranks 2, 4, 6 and another 4
    "model.layers.0.self_attn.q_proj": [0.3, 0.2],
    "model.layers.1.self_attn.v_proj": [0.3, 0.25, 0.2, 0.15],
    "model.layers.0.self_attn.o_proj": [0.4, 0.3, 0.2, 0.1],
    "model.layers.1.mlp.down_proj": [0.5, 0.4, 0.3, 0.25, 0.2, 0.15],
}


def test_energy_ranks_per_module(tmp_path, base_weights):
    deltas = {
        m: with_spectrum(*base_weights[f"{m}.weight"].shape, sigma, seed=i)
        for i, (m, sigma) in enumerate(SPECTRA.items())
    }
    tuned = fine_tune(base_weights, deltas)
    base_file, tuned_file = write_pair(tmp_path, base_weights, tuned)
    expected = {
        m: energy_rank(singular_values(tuned[f"{m}.weight"] - base_weights[f"{m}.weight"]), 0.999) for m in SPECTRA
    }
    assert expected == {m: len(sigma) for m, sigma in SPECTRA.items()}
    adapter = tmp_path / "adapter"

    report = cli_json("extract", base_file, tuned_file, "-o", adapter, "--energy", 0.999)
    assert extracted_ranks(report) == expected

    config = read_config(adapter)
    assert sorted(config["target_modules"]) == sorted(SPECTRA)
    assert config["r"] == config["lora_alpha"]
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert set(config["rank_pattern"]) == {m for m, r in expected.items() if r != config["r"]}
    for module, rank in expected.items():
        assert effective(config, module) == (rank, rank), module
    factors = load(adapter / "adapter_model.safetensors")
    for module, rank in expected.items():
        assert tuple(factors[f"base_model.model.{module}.lora_A.weight"].shape)[0] == rank

    model = PeftModel.from_pretrained(llama(base_weights), str(adapter)).eval()
    assert_loaded_ranks(model, expected)
    torch.testing.assert_close(outputs(model), outputs(llama(tuned)), atol=ATOL, rtol=0)


def test_budget_adapter_loads_and_fits_the_budget(tmp_path, base_weights):
    """Full-rank ΔW with decaying spectra on a few modules, the rest of the model unchanged."""
    changed = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    deltas = {}
    for i, module in enumerate(changed):
        m, n = base_weights[f"{module}.weight"].shape
        deltas[module] = with_spectrum(m, n, 0.1 * 0.85 ** np.arange(min(m, n)), seed=10 + i)
    tuned = fine_tune(base_weights, deltas)
    base_file, tuned_file = write_pair(tmp_path, base_weights, tuned)
    adapter = tmp_path / "adapter"
    budget = 0.25

    result = cli_json("extract", base_file, tuned_file, "-o", adapter, "--budget", budget)
    report = by_name(result)
    ranks = extracted_ranks(result)
    assert sorted(ranks) == sorted(changed)

    config = read_config(adapter)
    assert sorted(config["target_modules"]) == sorted(changed)
    for module, rank in ranks.items():
        assert effective(config, module) == (rank, rank), module
    model = PeftModel.from_pretrained(llama(base_weights), str(adapter)).eval()
    assert_loaded_ranks(model, ranks)
    factors = load(adapter / "adapter_model.safetensors")
    merged = weights(model.merge_and_unload())
    for module in changed:
        b = factors[f"base_model.model.{module}.lora_B.weight"]
        a = factors[f"base_model.model.{module}.lora_A.weight"]
        name = f"{module}.weight"
        torch.testing.assert_close(merged[name], base_weights[name] + b @ a, atol=1e-6, rtol=0)
        delta = tuned[name] - base_weights[name]
        assert rel(merged[name] - base_weights[name], delta) == pytest.approx(report[name]["rel_error"], rel=1e-4)

    adapter_params = sum(t.numel() for t in factors.values())
    extracted_params = sum(base_weights[f"{m}.weight"].numel() for m in changed)
    assert adapter_params == sum(r * sum(base_weights[f"{m}.weight"].shape) for m, r in ranks.items())
    assert adapter_params == result["totals"]["params_after"]
    # The report's own totals: params of the extracted modules, and the adapter within the budget.
    assert result["totals"]["params"] == extracted_params
    assert adapter_params <= budget * extracted_params, (adapter_params, budget * extracted_params, ranks)


# --- embeddings and conv kernels ------------------------------------------------------------------


def test_embedding_lora_loads_in_peft(tmp_path, base_weights):
    module = "model.embed_tokens"
    vocab, dim = base_weights[f"{module}.weight"].shape
    tuned = fine_tune(base_weights, {module: 0.05 * low_rank(vocab, dim, 2, seed=21)})
    base_file, tuned_file = write_pair(tmp_path, base_weights, tuned)
    adapter = tmp_path / "adapter"

    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--embeddings", "--rank", 2))
    assert report[f"{module}.weight"]["status"] == "extracted"
    assert report[f"{module}.weight"]["rank"] == 2
    config = read_config(adapter)
    assert config["target_modules"] == [module]
    factors = load(adapter / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in factors.items()} == {
        f"base_model.model.{module}.lora_embedding_A": (2, vocab),
        f"base_model.model.{module}.lora_embedding_B": (dim, 2),
    }

    tuned_logits = outputs(llama(tuned))
    assert (outputs(llama(base_weights)) - tuned_logits).abs().max() > 100 * ATOL
    model = PeftModel.from_pretrained(llama(base_weights), str(adapter)).eval()
    assert_loaded_ranks(model, {module: 2})
    torch.testing.assert_close(outputs(model), tuned_logits, atol=ATOL, rtol=0)


class ConvNet(torch.nn.Module):
    """A custom model PEFT knows nothing about: a 3×3 conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))  # (b, 3, 6, 6) -> (b, 8, 4, 4) -> (b, 5)


def conv_net(state: dict[str, torch.Tensor]) -> ConvNet:
    model = ConvNet().eval()
    model.load_state_dict(state, strict=True)
    return model


def test_conv_lora_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    base = weights(ConvNet())
    deltas = {
        "conv": 0.1 * low_rank(8, 3 * 3 * 3, 2, seed=31),  # (out, in·kh·kw), reshaped to the kernel
        "head": 0.02 * low_rank(5, 8 * 4 * 4, 2, seed=32),
    }
    tuned = fine_tune(base, deltas)
    base_file, tuned_file = write_pair(tmp_path, base, tuned)
    adapter = tmp_path / "adapter"

    result = cli_json("extract", base_file, tuned_file, "-o", adapter, "--conv", "--rank", 2)
    assert extracted_ranks(result) == {"conv": 2, "head": 2}
    report = by_name(result)
    assert report["conv.weight"]["params_after"] == 2 * (8 + 27)
    config = read_config(adapter)
    assert sorted(config["target_modules"]) == ["conv", "head"]
    factors = load(adapter / "adapter_model.safetensors")
    assert tuple(factors["base_model.model.conv.lora_A.weight"].shape) == (2, 3, 3, 3)
    assert tuple(factors["base_model.model.conv.lora_B.weight"].shape) == (8, 2, 1, 1)

    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(33))
    tuned_out = outputs(conv_net(tuned), x)
    assert (outputs(conv_net(base), x) - tuned_out).abs().max() > 100 * ATOL
    model = PeftModel.from_pretrained(conv_net(base), str(adapter)).eval()
    assert_loaded_ranks(model, {"conv": 2, "head": 2})
    torch.testing.assert_close(outputs(model, x), tuned_out, atol=ATOL, rtol=0)


class Embedder(torch.nn.Module):
    """DeBERTa-v2 style: an `embeddings` block holding the table and a Linear projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = torch.nn.Module()
        self.embeddings.word_embeddings = torch.nn.Embedding(50, 16)
        self.embeddings.embed_proj = torch.nn.Linear(16, 24, bias=False)
        self.head = torch.nn.Linear(24, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embeddings.embed_proj(self.embeddings.word_embeddings(ids)))  # (b, t) -> (b, t, 7)


def embedder(state: dict[str, torch.Tensor]) -> Embedder:
    model = Embedder().eval()
    model.load_state_dict(state, strict=True)
    return model


def test_linear_inside_an_embeddings_block_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    base = weights(Embedder())
    deltas = {
        "embeddings.word_embeddings": 0.1 * low_rank(50, 16, 2, seed=41),
        "embeddings.embed_proj": 0.1 * low_rank(24, 16, 2, seed=42),
    }
    tuned = fine_tune(base, deltas)
    base_file, tuned_file = write_pair(tmp_path, base, tuned)
    adapter = tmp_path / "adapter"

    cli_json("extract", base_file, tuned_file, "-o", adapter, "--embeddings", "--rank", 2)
    assert sorted(read_config(adapter)["target_modules"]) == sorted(deltas)

    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(43))
    tuned_out = outputs(embedder(tuned), ids)
    model = PeftModel.from_pretrained(embedder(base), str(adapter)).eval()
    assert_loaded_ranks(model, dict.fromkeys(deltas, 2))
    torch.testing.assert_close(outputs(model, ids), tuned_out, atol=ATOL, rtol=0)


# --- what changed beside the matrices: biases (lora_bias) and LayerNorms (modules_to_save) ---------

BERT = transformers.BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
BERT_TOKENS = torch.randint(0, BERT.vocab_size, (2, 10), generator=torch.Generator().manual_seed(50))
BERT_RANK = 2


def bert(state: dict[str, torch.Tensor] | None = None) -> transformers.BertModel:
    torch.manual_seed(0)
    model = transformers.BertModel(BERT).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def bert_outputs(model: torch.nn.Module) -> torch.Tensor:
    return model(BERT_TOKENS).last_hidden_state


def bert_fine_tune(base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Every Linear's ΔW of rank exactly BERT_RANK and its bias changed; LayerNorms changed in two places.

    Returns the tuned weights, the Linear modules and the LayerNorm modules that changed.
    """
    generator = torch.Generator().manual_seed(51)
    linears = sorted(n.removesuffix(".weight") for n, t in base.items() if t.ndim == 2 and "embeddings" not in n)
    norms = ["embeddings.LayerNorm", "encoder.layer.1.output.LayerNorm"]
    tuned = fine_tune(
        base, {m: 0.05 * low_rank(*base[f"{m}.weight"].shape, BERT_RANK, seed=60 + i) for i, m in enumerate(linears)}
    )
    for name in [f"{m}.bias" for m in linears] + [f"{m}.{p}" for m in norms for p in ("weight", "bias")]:
        tuned[name] = base[name] + 0.1 * torch.randn(base[name].shape, generator=generator)
    return tuned, linears, norms


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    base = weights(bert())
    tuned, linears, norms = bert_fine_tune(base)
    return folder, base, tuned, linears, norms, write_pair(folder, base, tuned)


def test_biases_and_norms_are_carried_and_the_adapter_reproduces_the_tuned_model(bert_pair):
    folder, base, tuned, linears, norms, (base_file, tuned_file) = bert_pair
    adapter = folder / "adapter"
    result = cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", BERT_RANK)

    config = read_config(adapter)
    assert sorted(config["target_modules"]) == linears
    assert config["lora_bias"] is True
    assert sorted(config["modules_to_save"]) == sorted(norms)
    assert config["base_model_name_or_path"] == str(folder.resolve())  # BASE's folder by default
    written = load(adapter / "adapter_model.safetensors")
    for module in linears:  # Δb, not the tuned bias
        delta = tuned[f"{module}.bias"] - base[f"{module}.bias"]
        torch.testing.assert_close(written[f"base_model.model.{module}.lora_B.bias"], delta, atol=1e-7, rtol=0)
    for module in norms:  # the tuned module whole
        for p in ("weight", "bias"):
            assert torch.equal(written[f"base_model.model.{module}.{p}"], tuned[f"{module}.{p}"])

    rows = by_name(result)
    carried = {f"{m}.bias" for m in linears} | {f"{m}.{p}" for m in norms for p in ("weight", "bias")}
    assert {n for n, t in rows.items() if t["status"] == "carried"} == carried
    for name in carried:
        assert rows[name]["params_after"] == base[name].numel()
    # The totals count what the file holds: LoRA pairs and carried tensors.
    assert result["totals"]["params_after"] == sum(t.numel() for t in written.values())

    tuned_out = bert_outputs(bert(tuned))
    assert rel(bert_outputs(bert(base)), tuned_out) > 1e-2  # the fine-tune shows
    model = PeftModel.from_pretrained(bert(base), str(adapter)).eval()
    assert_loaded_ranks(model, dict.fromkeys(linears, BERT_RANK))
    assert rel(bert_outputs(model), tuned_out) <= 1e-4
    merged = weights(model.merge_and_unload())
    for module in linears:
        torch.testing.assert_close(merged[f"{module}.bias"], tuned[f"{module}.bias"], atol=1e-6, rtol=0)


def test_lora_only_leaves_biases_and_norms_out(bert_pair):
    folder, base, tuned, linears, norms, (base_file, tuned_file) = bert_pair
    adapter = folder / "lora-only"
    result = cli_json("extract", base_file, tuned_file, "-o", adapter, "--rank", BERT_RANK, "--lora-only")

    config = read_config(adapter)
    assert (config["lora_bias"], config["modules_to_save"]) == (False, None)
    written = load(adapter / "adapter_model.safetensors")
    assert set(written) == {f"base_model.model.{m}.lora_{ab}.weight" for m in linears for ab in "AB"}
    rows = by_name(result)
    assert rows[f"{linears[0]}.bias"]["status"] == "skipped"
    assert "left out" in rows[f"{norms[0]}.weight"]["reason"]

    model = PeftModel.from_pretrained(bert(base), str(adapter)).eval()
    assert rel(bert_outputs(model), bert_outputs(bert(tuned))) > 1e-2  # the biases and norms are missing
