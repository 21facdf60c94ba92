"""The kohya LoRA format: extract --format kohya (names of files and of diffusers pipeline folders),
PEFT ↔ kohya through resize --format, and diffusers' load_lora_weights reading what extract wrote.
Every expected figure is computed here, from the inputs, with numpy."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import assert_clean_failure, by_name, cli, cli_json, file_metadata, load, save  # noqa: E402

from lowrank_cli.errors import OutputError  # noqa: E402
from lowrank_cli.io.kohya import kohya_names  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def tail(delta: np.ndarray, rank: int) -> float:
    """The optimal relative error of a rank-`rank` truncation: √(Σ_{i>r} σ²/Σ σ²)."""
    s = np.linalg.svd(delta, compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def kohya_delta(tensors: dict[str, torch.Tensor], prefix: str) -> np.ndarray:
    """ΔW as diffusers and sd-scripts compute it: alpha/r · up·down, up (out, r[, 1, 1]), down (r, in[, kh, kw])."""
    up, down = tensors[f"{prefix}.lora_up.weight"].double(), tensors[f"{prefix}.lora_down.weight"].double()
    rank = down.shape[0]
    alpha = float(tensors[f"{prefix}.alpha"]) if f"{prefix}.alpha" in tensors else rank
    return alpha / rank * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).numpy()


# --- extract --format kohya -----------------------------------------------------------------------

# A pipeline's model folders: {folder: {tensor: shape}}; the deltas are of rank 3, so rank 2 truncates.
PIPELINE = {
    "unet": {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (16, 16),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": (16, 16),
        "down_blocks.0.resnets.0.conv1.weight": (8, 4, 3, 3),
        "down_blocks.0.resnets.0.time_emb_proj.weight": (8, 12),
        "down_blocks.0.resnets.0.norm1.weight": (8,),
    },
    "text_encoder": {
        "text_model.encoder.layers.0.self_attn.q_proj.weight": (12, 12),
        "text_model.encoder.layers.0.mlp.fc1.weight": (20, 12),
        "text_model.embeddings.token_embedding.weight": (30, 12),
    },
}


def pipeline_folders(root: Path) -> dict[str, np.ndarray]:
    """BASE and TUNED pipeline folders (a vae/ beside, which kohya does not adapt); returns {name: ΔW}."""
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for folder, shapes in PIPELINE.items():
        base, tuned = {}, {}
        for name, shape in shapes.items():
            base[name] = torch.randn(shape, generator=generator)
            if len(shape) == 1 or "embedding" in name:
                delta = 0.1 * torch.randn(shape, generator=generator)
            else:
                m, n = shape[0], int(np.prod(shape[1:]))
                delta = (torch.randn(m, 3, generator=generator) @ torch.randn(3, n, generator=generator)).reshape(shape)
                deltas[f"{folder}.{name}"] = delta.double().reshape(m, n).numpy()
            tuned[name] = base[name] + delta
        for side, tensors in (("base", base), ("tuned", tuned)):
            (root / side / folder).mkdir(parents=True)
            save(root / side / folder / "model.safetensors", tensors)
    for side in ("base", "tuned"):
        (root / side / "vae").mkdir()
        save(root / side / "vae" / "model.safetensors", {"decoder.conv_out.weight": torch.ones(3, 4, 3, 3)})
    return deltas


def test_extract_kohya_from_pipeline_folders(tmp_path):
    deltas = pipeline_folders(tmp_path)
    out = tmp_path / "style.safetensors"
    report = cli_json("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", 2, "--conv",
                      "--format", "kohya", "--device", "cpu")  # fmt: skip
    written = load(out)
    # sd-scripts' names: the model's prefix, then the module's path with every '.' as '_'
    prefixes = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight":
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "unet.down_blocks.0.resnets.0.conv1.weight": "lora_unet_down_blocks_0_resnets_0_conv1",
        "unet.down_blocks.0.resnets.0.time_emb_proj.weight": "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight":
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight": "lora_te_text_model_encoder_layers_0_mlp_fc1",
    }  # fmt: skip
    suffixes = (".lora_up.weight", ".lora_down.weight", ".alpha")
    assert sorted(written) == sorted(prefix + suffix for prefix in prefixes.values() for suffix in suffixes)
    rows = by_name(report)
    for name, prefix in prefixes.items():
        assert float(written[f"{prefix}.alpha"]) == 2.0  # scale alpha/r = 1
        assert rel(kohya_delta(written, prefix), deltas[name]) == pytest.approx(tail(deltas[name], 2), rel=1e-4)
        assert rows[name]["status"] == "extracted"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tuple(written[f"{conv}.lora_down.weight"].shape) == (2, 4, 3, 3)
    assert tuple(written[f"{conv}.lora_up.weight"].shape) == (8, 2, 1, 1)
    assert "kohya file holds LoRA pairs only" in rows["unet.down_blocks.0.resnets.0.norm1.weight"]["reason"]
    assert not any(name.startswith("vae.") for name in rows)  # the VAE is not read
    metadata = file_metadata(out)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "2")
    recorded = json.loads(metadata["lowrank_modules"])  # each module's name in its own model
    assert recorded == {prefix: name.partition(".")[2].removesuffix(".weight") for name, prefix in prefixes.items()}


def test_kohya_names_follow_sd_scripts():
    names = kohya_names(["unet.mid_block.attentions.0.proj_in", "text_encoder.text_model.final", "text_encoder_2.x.y"],
                        pipeline=("unet", "text_encoder", "text_encoder_2"))  # fmt: skip
    assert [n.prefix for n in names.values()] == ["lora_unet_mid_block_attentions_0_proj_in",
                                                  "lora_te1_text_model_final", "lora_te2_x_y"]  # SDXL  # fmt: skip
    assert kohya_names(["text_model.a.b", "layers.0.q"]) == {
        "text_model.a.b": kohya_names(["text_model.a.b"])["text_model.a.b"],
        "layers.0.q": kohya_names(["layers.0.q"])["layers.0.q"],
    }
    assert kohya_names(["text_model.a.b"])["text_model.a.b"].prefix == "lora_te_text_model_a_b"
    assert kohya_names(["layers.0.q"])["layers.0.q"].prefix == "lora_unet_layers_0_q"
    with pytest.raises(OutputError, match="lora_unet_a_b_c"):
        kohya_names(["a_b.c", "a.b_c"])


def test_extract_kohya_refusals(tmp_path):
    pipeline_folders(tmp_path)
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    # a pipeline holds several models, and a PEFT adapter is for one
    result = cli("extract", base, tuned, "-o", tmp_path / "adapter", "--rank", 2)
    assert_clean_failure(result, 2, "--format kohya", "unet")
    assert_clean_failure(cli("extract", base, tuned, "-o", tmp_path / "a.safetensors", "--rank", 2, "--embeddings",
                             "--format", "kohya"), 2, "--embeddings")  # fmt: skip
    one = tuned / "unet" / "model.safetensors"
    assert_clean_failure(cli("extract", base, one, "-o", tmp_path / "b.safetensors", "--rank", 2, "--format", "kohya"),
                         2, "BASE and TUNED")  # fmt: skip
    (tmp_path / "folder").mkdir()
    assert_clean_failure(cli("extract", base, tuned, "-o", tmp_path / "folder", "--rank", 2, "--format", "kohya",
                             "--force"), 1, "one .safetensors file")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "folder", "tuned"]


# --- PEFT ↔ kohya ---------------------------------------------------------------------------------

PEFT_MODULES = {"layers.0.self_attn.q_proj": (24, 40), "layers.1.mlp.down_proj": (32, 16)}
PREFIX = "base_model.model."


def peft_adapter(folder: Path, rank: int = 8, **config) -> dict[str, np.ndarray]:
    """A PEFT adapter, rslora with an alpha_pattern unless told; returns {module: ΔW} as PEFT scales it."""
    generator = torch.Generator().manual_seed(1)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "use_rslora": True,
              "alpha_pattern": {"down_proj": 4}, "target_modules": ["q_proj", "down_proj"], **config}  # fmt: skip
    tensors, deltas = {}, {}
    for index, (module, (m, n)) in enumerate(PEFT_MODULES.items()):
        b = torch.randn(m, rank, generator=generator) * torch.logspace(0, -1 - index, rank)
        a = torch.randn(rank, n, generator=generator)
        tensors[f"{PREFIX}{module}.lora_B.weight"], tensors[f"{PREFIX}{module}.lora_A.weight"] = b, a
        alpha = config["alpha_pattern"].get(module.rpartition(".")[2], config["lora_alpha"])
        scale = alpha / np.sqrt(rank) if config["use_rslora"] else alpha / rank
        deltas[module] = scale * (b.double() @ a.double()).numpy()
    folder.mkdir()
    save(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return deltas


def peft_deltas(folder: Path) -> dict[str, np.ndarray]:
    """ΔW of each module as PEFT reads the folder: alpha/r · B·A, r and alpha from their patterns."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert not config["use_rslora"]
    factors = load(folder / "adapter_model.safetensors")
    deltas = {}
    for module in PEFT_MODULES:
        b, a = (factors[f"{PREFIX}{module}.lora_{x}.weight"].double() for x in "BA")
        rank = config["rank_pattern"].get(module, config["r"])
        assert b.shape[1] == a.shape[0] == rank
        deltas[module] = config["alpha_pattern"].get(module, config["lora_alpha"]) / rank * (b @ a).numpy()
    return deltas


def test_peft_to_kohya_and_back_keeps_keys_products_and_scale(tmp_path):
    deltas = peft_adapter(tmp_path / "adapter")
    # no policy: a conversion; B and A bit for bit, alpha = scale·r
    report = cli_json("resize", tmp_path / "adapter", "-o", tmp_path / "k.safetensors", "--format", "kohya")
    assert {t["status"] for t in report["tensors"]} == {"copied"}
    kohya = load(tmp_path / "k.safetensors")
    original = load(tmp_path / "adapter" / "adapter_model.safetensors")
    prefixes = {"layers.0.self_attn.q_proj": "lora_unet_layers_0_self_attn_q_proj",
                "layers.1.mlp.down_proj": "lora_unet_layers_1_mlp_down_proj"}  # fmt: skip
    assert sorted(kohya) == sorted(f"{p}.{s}" for p in prefixes.values() for s in ("alpha", "lora_up.weight",
                                                                                  "lora_down.weight"))  # fmt: skip
    for module, prefix in prefixes.items():
        assert torch.equal(kohya[f"{prefix}.lora_up.weight"], original[f"{PREFIX}{module}.lora_B.weight"])
        assert torch.equal(kohya[f"{prefix}.lora_down.weight"], original[f"{PREFIX}{module}.lora_A.weight"])
        assert rel(kohya_delta(kohya, prefix), deltas[module]) < 4 * EPS32  # alpha stored in float32
    # and back: the same keys as the original adapter, the same products
    cli_json("resize", tmp_path / "k.safetensors", "-o", tmp_path / "back", "--format", "peft")
    back = load(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[key], original[key]) for key in original)
    for module, delta in peft_deltas(tmp_path / "back").items():
        assert rel(delta, deltas[module]) < 4 * EPS32, module
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text(encoding="utf-8"))
    assert sorted(config["target_modules"]) == sorted(PEFT_MODULES)


def test_resize_while_converting_gives_the_optimal_truncation(tmp_path):
    deltas = peft_adapter(tmp_path / "adapter")
    report = cli_json("resize", tmp_path / "adapter", "-o", tmp_path / "k3.safetensors", "--format", "kohya",
                      "--rank", 3, "--device", "cpu")  # fmt: skip
    kohya = load(tmp_path / "k3.safetensors")
    for module, delta in deltas.items():
        prefix = "lora_unet_" + module.replace(".", "_")
        assert float(kohya[f"{prefix}.alpha"]) == 3.0
        assert rel(kohya_delta(kohya, prefix), delta) == pytest.approx(tail(delta, 3), rel=1e-5, abs=1e-7)
        assert by_name(report)[module]["rel_error"] == pytest.approx(tail(delta, 3), rel=1e-5, abs=1e-7)
    assert json.loads(file_metadata(tmp_path / "k3.safetensors")["lowrank_modules"]) == {
        "lora_unet_" + module.replace(".", "_"): module for module in PEFT_MODULES
    }
    cli_json("resize", tmp_path / "k3.safetensors", "-o", tmp_path / "p2", "--format", "peft", "--rank", 2)
    for module, delta in peft_deltas(tmp_path / "p2").items():
        assert rel(delta, deltas[module]) == pytest.approx(tail(delta=deltas[module], rank=2), rel=1e-4), module


def test_extract_kohya_is_read_by_resize(tmp_path):
    deltas = pipeline_folders(tmp_path)
    out = tmp_path / "r3.safetensors"
    cli_json("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", 3, "--conv", "--format", "kohya")
    report = cli_json("resize", out, "-o", tmp_path / "r1.safetensors", "--rank", 1, "--device", "cpu")
    resized = load(tmp_path / "r1.safetensors")
    names = kohya_names([name.removesuffix(".weight") for name in deltas], pipeline=("unet", "text_encoder"))
    delta_of = {names[name.removesuffix(".weight")].prefix: delta for name, delta in deltas.items()}
    assert sorted(by_name(report)) == sorted(delta_of)
    for prefix, delta in delta_of.items():
        assert rel(kohya_delta(resized, prefix), delta) == pytest.approx(tail(delta, 1), rel=1e-4), prefix


def test_conversion_refusals(tmp_path):
    foreign = save(tmp_path / "foreign.safetensors", {"lora_unet_a_b.lora_up.weight": torch.ones(4, 2),
                                                      "lora_unet_a_b.lora_down.weight": torch.ones(2, 3)})  # fmt: skip
    assert_clean_failure(cli("resize", foreign, "-o", tmp_path / "p", "--format", "peft"), 1, "lowrank_modules")
    both = {f"{p}_x.lora_{s}.weight": torch.ones(2, 2) for p in ("lora_unet", "lora_te") for s in ("up", "down")}
    save(tmp_path / "both.safetensors", both, metadata={"lowrank_modules": json.dumps({"lora_unet_x": "x",
                                                                                     "lora_te_x": "x"})})  # fmt: skip
    assert_clean_failure(cli("resize", tmp_path / "both.safetensors", "-o", tmp_path / "p", "--format", "peft"),
                         1, "2 models")  # fmt: skip
    peft_adapter(tmp_path / "biased")
    tensors = load(tmp_path / "biased" / "adapter_model.safetensors")
    save(tmp_path / "biased" / "adapter_model.safetensors",
         {**tensors, f"{PREFIX}layers.0.self_attn.q_proj.lora_B.bias": torch.ones(24)})  # fmt: skip
    assert_clean_failure(cli("resize", tmp_path / "biased", "-o", tmp_path / "k.safetensors", "--format", "kohya"),
                         1, "lora_B.bias")  # fmt: skip
    # the same format and no policy: nothing to do
    assert_clean_failure(cli("resize", foreign, "-o", tmp_path / "k.safetensors", "--format", "kohya"), 2, "--rank")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["biased", "both.safetensors", "foreign.safetensors"]


# --- diffusers reads what extract writes ----------------------------------------------------------


def tiny_pipeline(seed: int):
    """A StableDiffusionPipeline of a tiny UNet2DConditionModel, CLIP text encoder and VAE, made from configs."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, projection_dim=16,
    ))  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )  # fmt: skip
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
        scheduler=diffusers.DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def test_diffusers_loads_the_extracted_kohya_lora(tmp_path):
    pipe = tiny_pipeline(0)
    pipe.save_pretrained(tmp_path / "base")
    base = {model: {k: v.detach().clone() for k, v in getattr(pipe, model).state_dict().items()}
            for model in ("unet", "text_encoder")}  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "fine-tune": rank-3 changes to every Linear and Conv2d of the UNet and text encoder
        for model in ("unet", "text_encoder"):
            for module in getattr(pipe, model).modules():
                if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                    m, n = module.weight.shape[0], module.weight[0].numel()
                    k = min(3, m, n)
                    change = torch.randn(m, k, generator=generator) @ torch.randn(k, n, generator=generator)
                    module.weight += 0.1 * change.reshape(module.weight.shape)
    pipe.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "tuned.kohya.safetensors"
    report = cli_json("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", 3, "--conv",
                      "--format", "kohya", "--device", "cpu")  # fmt: skip
    lora = load(out)
    extracted = [t for t in report["tensors"] if t["status"] == "extracted"]
    assert len(extracted) == len(lora) // 3 > 50

    loaded = tiny_pipeline(0)
    loaded.unet.load_state_dict(base["unet"])
    loaded.text_encoder.load_state_dict(base["text_encoder"])
    loaded.load_lora_weights(str(out))
    loaded.fuse_lora(lora_scale=1.0)
    loaded.unload_lora_weights()
    names = kohya_names([t["name"].removesuffix(".weight") for t in extracted], pipeline=("unet", "text_encoder"))
    changed = 0
    for model in ("unet", "text_encoder"):
        state = getattr(loaded, model).state_dict()
        assert sorted(state) == sorted(base[model])  # fused, and nothing of the LoRA left behind
        for key, value in state.items():
            name = names.get(f"{model}.{key}".removesuffix(".weight"))
            before = base[model][key].double()
            expected = before.numpy()
            if name is not None and key.endswith(".weight"):  # base + alpha/r · up·down, from the file
                expected = expected + kohya_delta(lora, name.prefix).reshape(value.shape)
                changed += 1
            # float32 arithmetic on values of this size: a few ulps of the largest term
            tolerance = 16 * EPS32 * (np.abs(expected).max() + before.abs().max().item())
            np.testing.assert_allclose(value.double().numpy(), expected, rtol=0, atol=tolerance, err_msg=key)
    assert changed == len(extracted)  # diffusers applied every pair the file holds
