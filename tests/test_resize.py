"""`lowrank resize`: a LoRA (PEFT or kohya) at new ranks, checked against numpy's SVD of the product
B·A, and loaded by PEFT; every expected figure is computed here from the input factors."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import (  # noqa: E402
    assert_clean_failure,
    by_name,
    cli,
    cli_json,
    file_metadata,
    listing,
    load,
    save,
    sha256,
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lowrank_cli  # noqa: E402

PREFIX = "base_model.model."
MODULES = {"layers.0.q": (24, 40), "layers.1.q": (32, 16), "layers.1.out": (20, 28)}  # module -> (out, in)


def peft_adapter(
    folder: Path, rank: int = 8, alpha: float = 16.0, seed: int = 0, ranks: dict[str, int] | None = None, **config
) -> dict:
    """A PEFT adapter of random B·A, of rank `rank` or ranks[module]; returns {module: ΔW = alpha/rank·B·A} in
    float64 numpy (alpha/rank: without rank_pattern, alpha_pattern or use_rslora)."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for index, (module, (m, n)) in enumerate(MODULES.items()):
        r = (ranks or {}).get(module, rank)
        # σ falling by 1, 2, 3 decades: energy and error targets pick different ranks per module
        b = torch.randn(m, r, generator=generator) * torch.logspace(0, -1 - index, r)
        a = torch.randn(r, n, generator=generator)
        tensors[f"{PREFIX}{module}.lora_B.weight"], tensors[f"{PREFIX}{module}.lora_A.weight"] = b, a
        deltas[module] = alpha / r * (b.double().numpy() @ a.double().numpy())
    folder.mkdir()
    save(folder / "adapter_model.safetensors", tensors)
    fields = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q", "out"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(fields), encoding="utf-8")
    return deltas


def written_deltas(folder: Path) -> dict[str, np.ndarray]:
    """ΔW′ of each module as PEFT computes it from the written adapter: alpha/r · B·A, alpha by alpha_pattern."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    factors = load(folder / "adapter_model.safetensors")
    deltas = {}
    for module in MODULES:
        b = factors[f"{PREFIX}{module}.lora_B.weight"].double().numpy()
        a = factors[f"{PREFIX}{module}.lora_A.weight"].double().numpy()
        rank = config["rank_pattern"].get(module, config["r"])
        assert a.shape[0] == b.shape[1] == rank, module
        deltas[module] = config["alpha_pattern"].get(module, config["lora_alpha"]) / rank * (b @ a)
    return deltas


def tail(delta: np.ndarray, rank: int) -> float:
    """The optimal relative error of a rank-`rank` truncation: √(Σ_{i>r} σ²/Σ σ²)."""
    s = np.linalg.svd(delta, compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_rank_gives_the_optimal_truncation_of_the_product(tmp_path):
    deltas = peft_adapter(tmp_path / "adapter")
    report = cli_json("resize", tmp_path / "adapter", "-o", tmp_path / "r3", "--rank", 3, "--device", "cpu")
    rows = by_name(report)
    resized = written_deltas(tmp_path / "r3")
    for module, delta in deltas.items():
        optimal = tail(delta, 3)
        assert rel(resized[module], delta) == pytest.approx(optimal, rel=1e-5, abs=1e-7), module
        assert rows[module]["rel_error"] == pytest.approx(optimal, rel=1e-5, abs=1e-7), module
        assert (rows[module]["rank_before"], rows[module]["rank"], rows[module]["status"]) == (8, 3, "resized")
        assert rows[module]["params_after"] == 3 * sum(MODULES[module])
    config = json.loads((tmp_path / "r3" / "adapter_config.json").read_text(encoding="utf-8"))
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (3, 3, False)  # scale 1
    assert config["target_modules"] == ["q", "out"]  # the rest of the config as it was


def test_max_error_is_met_on_every_module_as_written(tmp_path):
    deltas = peft_adapter(tmp_path / "adapter", seed=1)
    report = cli_json("resize", tmp_path / "adapter", "-o", tmp_path / "e", "--max-error", 0.05, "--device", "cpu")
    resized = written_deltas(tmp_path / "e")
    for module, delta in deltas.items():
        rank = by_name(report)[module]["rank"]
        assert rel(resized[module], delta) <= 0.05, module
        assert tail(delta, rank - 1) > 0.05, module  # the smallest such rank
    assert len({t["rank"] for t in report["tensors"]}) > 1  # ranks differ: rank_pattern carries them


def test_rslora_and_alpha_pattern_are_read_as_peft_reads_them(tmp_path):
    folder = tmp_path / "adapter"
    deltas = peft_adapter(folder, use_rslora=True, alpha_pattern={"out": 4.0})
    for module in deltas:  # PEFT's scale under rslora: alpha/√r, alpha from the pattern matching the name's end
        deltas[module] *= 8 / np.sqrt(8) * (4.0 if module.endswith("out") else 16.0) / 16.0
    cli_json("resize", folder, "-o", tmp_path / "full", "--rank", 8, "--device", "cpu")
    for module, delta in written_deltas(tmp_path / "full").items():
        assert rel(delta, deltas[module]) < 1e-6, module


def test_budget_fits_and_unselected_pairs_are_copied(tmp_path):
    deltas = peft_adapter(tmp_path / "adapter", seed=2)
    report = cli_json(
        "resize", tmp_path / "adapter", "-o", tmp_path / "b", "--budget", 0.1, "--exclude", "layers.1.out"
    )
    rows = by_name(report)
    assert rows["layers.1.out"]["status"] == "copied"
    assert rel(written_deltas(tmp_path / "b")["layers.1.out"], deltas["layers.1.out"]) < 1e-7
    selected = [m for m in MODULES if m != "layers.1.out"]
    used = sum(rows[m]["rank"] * sum(MODULES[m]) for m in selected)
    assert used <= 0.1 * sum(MODULES[m][0] * MODULES[m][1] for m in selected)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 20),
    rank=st.integers(1, 12),
    alpha=st.floats(0.5, 64),
    seed=st.integers(0, 2**16),
)
def test_full_rank_reproduces_the_product(m, n, rank, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    b, a = torch.randn(m, rank, generator=generator), torch.randn(rank, n, generator=generator)
    delta = alpha / rank * (b.double().numpy() @ a.double().numpy())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lora.safetensors"
        save(path, {"lora_unet_x.lora_up.weight": b, "lora_unet_x.lora_down.weight": a,
                    "lora_unet_x.alpha": torch.tensor(alpha)})  # fmt: skip
        report = lowrank_cli.resize(path, Path(folder) / "out.safetensors", rank=rank, device="cpu")
        written = load(Path(folder) / "out.safetensors")
    kept = report.tensors[0].rank
    assert kept == min(m, n, rank)
    up, down = written["lora_unet_x.lora_up.weight"].double().numpy(), written["lora_unet_x.lora_down.weight"]
    resized = float(written["lora_unet_x.alpha"]) / kept * (up @ down.double().numpy())
    assert np.abs(resized - delta).max() <= 1e-5 * max(1.0, np.abs(delta).max())


# --- ΔW as PEFT reads a config: its ranks, its alphas, and configs PEFT cannot read ---------------


class Layers(torch.nn.Module):
    """The modules of MODULES as Linear layers under their names (layers.0.q, …), for PEFT to adapt."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict() for _ in range(2))
        for module, (m, n) in MODULES.items():
            _, index, name = module.split(".")
            self.layers[int(index)][name] = torch.nn.Linear(n, m)


def peft_computed_deltas(folder: Path) -> dict[str, np.ndarray]:
    """{module: ΔW} as PEFT itself computes it for the adapter in `folder` (LoraLayer.get_delta_weight)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(Layers(), str(folder))
    layers = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        return {module: layers[module].get_delta_weight("default").double().numpy() for module in MODULES}


@pytest.mark.parametrize("rslora", [False, True])
def test_patterns_and_rslora_scale_as_peft_scales(tmp_path, rslora):
    pytest.importorskip("peft")
    folder = tmp_path / "adapter"
    # rank_pattern and alpha_pattern keys are regular expressions matched at the end of the name
    peft_adapter(folder, ranks={"layers.1.out": 4}, rank_pattern={r"1\.out": 4},
                 alpha_pattern={r"layers\.[01]\.q": 3.5}, use_rslora=rslora)  # fmt: skip
    deltas = peft_computed_deltas(folder)
    cli_json("resize", folder, "-o", tmp_path / "full", "--rank", 8, "--device", "cpu")
    for module, delta in peft_computed_deltas(tmp_path / "full").items():
        assert rel(delta, deltas[module]) < 1e-5, module
    report = cli_json("resize", folder, "-o", tmp_path / "r2", "--rank", 2, "--device", "cpu")
    for module, delta in peft_computed_deltas(tmp_path / "r2").items():
        assert rel(delta, deltas[module]) == pytest.approx(tail(deltas[module], 2), rel=1e-4), module
        assert by_name(report)[module]["rel_error"] == pytest.approx(tail(deltas[module], 2), rel=1e-4), module


@pytest.mark.parametrize(
    ("config", "field"),
    [({"r": 16}, "r is 16"), ({"r": 0}, "r is 0"), ({"rank_pattern": {"q": 4}}, "rank_pattern 'q' is 4")],
)
def test_a_config_that_disagrees_with_its_tensors_is_refused_as_peft_refuses_it(tmp_path, config, field):
    pytest.importorskip("peft")
    from peft import PeftModel

    folder = tmp_path / "adapter"
    peft_adapter(folder, **config)  # rank-8 tensors
    with pytest.raises((RuntimeError, ValueError)):  # PEFT's own load: size mismatch, or r ≤ 0
        PeftModel.from_pretrained(Layers(), str(folder))
    before = {path.name: sha256(path) for path in folder.iterdir()}
    result = cli("resize", folder, "-o", tmp_path / "out", "--rank", 3)
    assert_clean_failure(result, 1, "adapter_config.json", field)
    assert listing(tmp_path) == ["adapter"] and listing(folder) == ["adapter_config.json", "adapter_model.safetensors"]
    assert {path.name: sha256(path) for path in folder.iterdir()} == before


BAD_CONFIGS = {  # adapter_config.json as text -> what the refusal names
    "lora_alpha null": ('{"peft_type": "LORA", "r": 8, "lora_alpha": null}', "lora_alpha is None"),
    "lora_alpha NaN": ('{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}', "lora_alpha is nan"),
    "lora_alpha Infinity": ('{"peft_type": "LORA", "r": 8, "lora_alpha": -Infinity}', "lora_alpha is -inf"),
    "lora_alpha text": ('{"peft_type": "LORA", "r": 8, "lora_alpha": "16"}', "lora_alpha is '16'"),
    "lora_alpha true": ('{"peft_type": "LORA", "r": 8, "lora_alpha": true}', "lora_alpha is True"),
    "r text": ('{"peft_type": "LORA", "r": "8"}', "r is '8'"),
    "r float": ('{"peft_type": "LORA", "r": 8.0}', "r is 8.0"),
    "alpha_pattern value": ('{"peft_type": "LORA", "r": 8, "alpha_pattern": {"q": "x"}}', "alpha_pattern 'q' is 'x'"),
    "alpha_pattern key": ('{"peft_type": "LORA", "r": 8, "alpha_pattern": {"query(": 4}}', "'query('"),
    "rank_pattern key": ('{"peft_type": "LORA", "r": 8, "rank_pattern": {"[": 8}}', "rank_pattern key '['"),
    "rank_pattern list": ('{"peft_type": "LORA", "r": 8, "rank_pattern": []}', "rank_pattern is []"),
    "use_rslora text": ('{"peft_type": "LORA", "r": 8, "use_rslora": "yes"}', "use_rslora is 'yes'"),
    "a list": ("[]", "a JSON list"),
    "a number": ("8", "a JSON int"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_config_peft_cannot_read_is_refused_in_one_line(tmp_path, case):
    text, named = BAD_CONFIGS[case]
    folder = tmp_path / "adapter"
    peft_adapter(folder)
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")
    result = cli("resize", folder, "-o", tmp_path / "out", "--rank", 3)
    assert_clean_failure(result, 1, "adapter_config.json", named)
    assert not (tmp_path / "out").exists()


def kohya_deltas(path: Path) -> dict[str, np.ndarray]:
    """{prefix: ΔW} as kohya reads the file: .alpha / r · up·down (no .alpha: alpha = r)."""
    tensors = load(path)
    deltas = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            prefix = key.removesuffix(".lora_down.weight")
            up = tensors[f"{prefix}.lora_up.weight"].double()
            rank = down.shape[0]
            alpha = float(tensors[f"{prefix}.alpha"]) if f"{prefix}.alpha" in tensors else rank
            deltas[prefix] = alpha / rank * (up.reshape(up.shape[0], rank) @ down.double().reshape(rank, -1)).numpy()
    return deltas


def test_a_zero_alpha_is_written_as_a_zero_delta(tmp_path):
    peft_adapter(tmp_path / "adapter", alpha=0.0)  # B and A random, ΔW = 0/8·B·A = 0
    report = cli_json("resize", tmp_path / "adapter", "-o", tmp_path / "r3", "--rank", 3, "--device", "cpu")
    assert {t["status"] for t in report["tensors"]} == {"copied"}
    assert all(not delta.any() for delta in written_deltas(tmp_path / "r3").values())
    cli_json("resize", tmp_path / "adapter", "-o", tmp_path / "k.safetensors", "--format", "kohya", "--rank", 3)
    assert all(not delta.any() for delta in kohya_deltas(tmp_path / "k.safetensors").values())
    # a kohya file whose .alpha are all 0, resized as kohya and converted to PEFT
    generator = torch.Generator().manual_seed(4)
    tensors, modules = {}, {}
    for module, (m, n) in MODULES.items():
        prefix = "lora_unet_" + module.replace(".", "_")
        modules[prefix] = module
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(m, 8, generator=generator)
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(8, n, generator=generator)
        tensors[f"{prefix}.alpha"] = torch.tensor(0.0)
    source = save(tmp_path / "zero.safetensors", tensors, metadata={"ss_network_dim": "8", "ss_network_alpha": "0",
                                                                   "lowrank_modules": json.dumps(modules)})  # fmt: skip
    cli_json("resize", source, "-o", tmp_path / "z3.safetensors", "--rank", 3, "--device", "cpu")
    assert all(not delta.any() for delta in kohya_deltas(tmp_path / "z3.safetensors").values())
    assert file_metadata(tmp_path / "z3.safetensors")["ss_network_alpha"] == "0"
    cli_json("resize", source, "-o", tmp_path / "zp", "--format", "peft", "--rank", 3, "--device", "cpu")
    assert all(not delta.any() for delta in written_deltas(tmp_path / "zp").values())


# --- kohya ----------------------------------------------------------------------------------------


def kohya_file(path: Path) -> dict[str, np.ndarray]:
    """A kohya LoRA: a linear pair with an fp16 alpha, a conv pair (3×3 down, 1×1 up), a pair without alpha."""
    generator = torch.Generator().manual_seed(3)
    shapes = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((16, 8), (8, 24), 4.0),
        "lora_unet_down_blocks_0_resnets_0_conv1": ((12, 8, 1, 1), (8, 6, 3, 3), 8.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": ((20, 8), (8, 10), None),
    }
    tensors, deltas = {}, {}
    for prefix, (up_shape, down_shape, alpha) in shapes.items():
        up, down = torch.randn(up_shape, generator=generator), torch.randn(down_shape, generator=generator)
        tensors[f"{prefix}.lora_up.weight"], tensors[f"{prefix}.lora_down.weight"] = up, down
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        scale = (alpha or 8) / 8
        deltas[prefix] = scale * (up.double().reshape(up_shape[0], 8).numpy() @ down.double().reshape(8, -1).numpy())
    # sd-scripts' hashes of these tensors (sshs_*, the model spec's), which no resized file has
    hashes = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8, "modelspec.hash_sha256": "0x" + "0" * 64}
    save(path, tensors, metadata={"ss_network_dim": "8", "ss_network_alpha": "4", "ss_other": "kept", **hashes})
    return deltas


def test_kohya_round_trips_and_resizes(tmp_path):
    source = tmp_path / "lora.safetensors"
    deltas = kohya_file(source)
    report = cli_json("resize", source, "-o", tmp_path / "r2.safetensors", "--rank", 2, "--device", "cpu")
    original, written = load(source), load(tmp_path / "r2.safetensors")
    assert sorted(written) == sorted({*original, "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"})
    assert file_metadata(tmp_path / "r2.safetensors") == {
        "ss_network_dim": "2",
        "ss_network_alpha": "2",
        "ss_other": "kept",
    }  # fmt: skip  (the hashes dropped)
    for prefix, delta in deltas.items():
        up, down = written[f"{prefix}.lora_up.weight"], written[f"{prefix}.lora_down.weight"]
        before_up, before_down = original[f"{prefix}.lora_up.weight"], original[f"{prefix}.lora_down.weight"]
        assert tuple(up.shape) == (before_up.shape[0], 2, *before_up.shape[2:])  # conv: (out, r′, 1, 1)
        assert tuple(down.shape) == (2, *before_down.shape[1:])  # conv: (r′, in, 3, 3)
        assert float(written[f"{prefix}.alpha"]) == 2.0  # scale alpha/r′ = 1
        resized = up.double().reshape(up.shape[0], 2).numpy() @ down.double().reshape(2, -1).numpy()
        assert rel(resized, delta) == pytest.approx(tail(delta, 2), rel=1e-5), prefix
        assert by_name(report)[prefix]["rel_error"] == pytest.approx(tail(delta, 2), rel=1e-5), prefix
    # the full rank reads back the file's own product: the alpha scale is preserved
    cli_json("resize", source, "-o", tmp_path / "r8.safetensors", "--rank", 8)
    again = load(tmp_path / "r8.safetensors")
    for prefix, delta in deltas.items():
        up, down = again[f"{prefix}.lora_up.weight"], again[f"{prefix}.lora_down.weight"]
        product = (
            float(again[f"{prefix}.alpha"]) / 8 * (up.double().reshape(up.shape[0], 8) @ down.double().reshape(8, -1))
        )
        assert rel(product.numpy(), delta) < 1e-6, prefix


def test_max_error_holds_on_a_kohya_file_written_in_float16(tmp_path):
    source = tmp_path / "lora.safetensors"
    deltas = kohya_file(source)
    out = tmp_path / "e.safetensors"
    report = cli_json("resize", source, "-o", out, "--max-error", 0.3, "--dtype", "float16", "--device", "cpu")
    written = load(out)
    for prefix, delta in deltas.items():
        up, down = written[f"{prefix}.lora_up.weight"], written[f"{prefix}.lora_down.weight"]
        assert up.dtype == down.dtype == torch.float16
        rank = down.shape[0]
        resized = float(written[f"{prefix}.alpha"]) / rank * (up.double().reshape(up.shape[0], rank) @
                                                              down.double().reshape(rank, -1)).numpy()  # fmt: skip
        assert rel(resized, delta) <= 0.3, prefix  # measured on the file: float16 rounding included
        assert by_name(report)[prefix]["rel_error"] == pytest.approx(rel(resized, delta), rel=1e-6), prefix


BAD_KOHYA = {  # tensors as (dtype, shape or a scalar's value) over a float32 (24, 8) up, (8, 40) down -> the key named
    "integer up": ({"lora_up.weight": (torch.int32, (24, 8)), "lora_down.weight": (torch.int32, (8, 40))}, "lora_up"),
    "integer down": ({"lora_down.weight": (torch.int64, (8, 40))}, "lora_down"),
    "rank 0": ({"lora_up.weight": (torch.float32, (24, 0)), "lora_down.weight": (torch.float32, (0, 40))}, "lora_up"),
    "no columns": ({"lora_down.weight": (torch.float32, (8, 0))}, "lora_down"),
    "alpha of shape (0,)": ({"alpha": (torch.float32, (0,))}, "alpha"),
    "alpha of shape (2,)": ({"alpha": (torch.float32, (2,))}, "alpha"),
    "alpha bool": ({"alpha": (torch.bool, ())}, "alpha"),
    "alpha inf": ({"alpha": (torch.float32, float("inf"))}, "alpha"),
    "alpha nan": ({"alpha": (torch.float16, float("nan"))}, "alpha"),
}


@pytest.mark.parametrize("case", sorted(BAD_KOHYA))
def test_a_kohya_pair_without_a_delta_is_refused_by_name(tmp_path, case):
    changed, named = BAD_KOHYA[case]
    tensors = {"lora_unet_x.lora_up.weight": torch.randn(24, 8), "lora_unet_x.lora_down.weight": torch.randn(8, 40),
               "lora_unet_x.alpha": torch.tensor(4.0)}  # fmt: skip
    for suffix, (dtype, shape) in changed.items():
        value = torch.tensor(shape) if isinstance(shape, float) else torch.ones(shape)
        tensors[f"lora_unet_x.{suffix}"] = value.to(dtype)
    source = save(tmp_path / "lora.safetensors", tensors)
    digest = sha256(source)
    result = cli("resize", source, "-o", tmp_path / "out.safetensors", "--rank", 2)
    assert_clean_failure(result, 1, "lora.safetensors", f"'lora_unet_x.{named}")
    assert listing(tmp_path) == ["lora.safetensors"] and sha256(source) == digest


def test_an_integer_alpha_is_a_number(tmp_path):
    generator = torch.Generator().manual_seed(6)
    up, down = torch.randn(24, 8, generator=generator), torch.randn(8, 40, generator=generator)
    tensors = {"lora_unet_x.lora_up.weight": up, "lora_unet_x.lora_down.weight": down,
               "lora_unet_x.alpha": torch.tensor(4, dtype=torch.int64)}  # fmt: skip
    source = save(tmp_path / "lora.safetensors", tensors)
    cli_json("resize", source, "-o", tmp_path / "full.safetensors", "--rank", 8, "--device", "cpu")
    delta = 4 / 8 * (up.double() @ down.double()).numpy()
    assert rel(kohya_deltas(tmp_path / "full.safetensors")["lora_unet_x"], delta) < 1e-6


def missed_bounds(result) -> tuple[float, float | None]:
    """The bounds a --max-error refusal says the full rank meets: as stored, and with --dtype float64."""
    found = re.search(r"needs --max-error (\S+) or more(?: \((\S+) with --dtype float64\))?", result.stderr)
    assert found, result.stderr
    return float(found[1]), None if found[2] is None else float(found[2])


def test_a_max_error_no_rank_meets_is_refused_with_a_fix_that_holds(tmp_path):
    deltas = peft_adapter(tmp_path / "adapter", seed=7)  # float32 factors
    one = ("--include", "layers.0.q", "--device", "cpu")  # one module: the fix named is its own
    # 1e-9: float32 factors cannot hold it, float64 ones can
    result = cli(
        "resize", tmp_path / "adapter", "-o", tmp_path / "out", "--max-error", 1e-9, "--dtype", "float32", *one
    )
    assert_clean_failure(result, 1, "layers.0.q")
    assert result.stderr.rsplit(";", 1)[1].strip() == "use --dtype float64"  # not the float32 it was given
    cli_json("resize", tmp_path / "adapter", "-o", tmp_path / "f64", "--max-error", 1e-9, "--dtype", "float64", *one)
    assert rel(written_deltas(tmp_path / "f64")["layers.0.q"], deltas["layers.0.q"]) <= 1e-9
    # 0: no rounded factors are exact; the bounds it names are met, as stored and in float64
    result = cli("resize", tmp_path / "adapter", "-o", tmp_path / "out", "--max-error", 0, *one)
    assert_clean_failure(result, 1, "layers.0.q", "--max-error 0 ")
    stored, wide = missed_bounds(result)
    assert wide is not None and 0 < wide < stored
    for bound, dtype, out in ((stored, "keep", "b32"), (wide, "float64", "b64")):
        cli_json("resize", tmp_path / "adapter", "-o", tmp_path / out, "--max-error", bound, "--dtype", dtype, *one)
        assert rel(written_deltas(tmp_path / out)["layers.0.q"], deltas["layers.0.q"]) <= bound, dtype
    assert listing(tmp_path) == ["adapter", "b32", "b64", "f64"]


def test_other_adapter_kinds_are_refused_by_name(tmp_path):
    path = save(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.ones(2, 2)})
    assert_clean_failure(cli("resize", path, "-o", tmp_path / "out.safetensors", "--rank", 1), 1, "LoHa")
    folder = tmp_path / "dora"
    peft_adapter(folder, use_dora=True)
    assert_clean_failure(cli("resize", folder, "-o", tmp_path / "out", "--rank", 1), 1, "DoRA")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


# --- PEFT loads what resize writes ----------------------------------------------------------------


def test_peft_loads_the_resized_adapter(tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, PeftModel, get_peft_model

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip

    def llama(state=None):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        if state is not None:
            model.load_state_dict(state)
        return model

    base = {name: t.detach().clone() for name, t in llama().state_dict().items()}
    model = get_peft_model(llama(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        lora_bs = [parameter for name, parameter in model.named_parameters() if "lora_B" in name]
        for index, parameter in enumerate(lora_bs):  # PEFT starts B at zero: spectra falling 1, 2 or 3 decades
            decay = torch.logspace(0, -1 - index % 3, 8)
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator) * decay)
    model.save_pretrained(tmp_path / "adapter")

    report = cli_json("resize", tmp_path / "adapter", "-o", tmp_path / "small", "--energy", 0.95, "--device", "cpu")
    assert len({t["rank"] for t in report["tensors"]}) > 1  # per-module ranks, through rank_pattern
    factors = load(tmp_path / "small" / "adapter_model.safetensors")
    merged = dict(base)
    for t in report["tensors"]:  # base + ΔW′, ΔW′ = B′·A′ at scale 1
        b, a = (factors[f"{PREFIX}{t['name']}.lora_{x}.weight"] for x in "BA")
        merged[f"{t['name']}.weight"] = base[f"{t['name']}.weight"] + b @ a
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = PeftModel.from_pretrained(llama(base), str(tmp_path / "small")).eval()
    for name, module in loaded.named_modules():
        if hasattr(module, "scaling") and "default" in getattr(module, "r", {}):
            assert module.r["default"] == by_name(report)[name.removeprefix(PREFIX)]["rank"], name
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, llama(merged)(tokens).logits, atol=1e-4, rtol=0)
