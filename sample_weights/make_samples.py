"""Regenerate the sample checkpoints: python sample_weights/make_samples.py

seed_rank2.safetensors  the reference example: W = randn(10, 2) @ randn(2, 10) (rank 2), a bias b, an input x
demo.safetensors        a small model-like checkpoint: layers of several shapes with decaying spectra
                        (low rank plus noise), one bfloat16 layer, biases, norms, a conv kernel, an int64 buffer
demo_tuned.safetensors  a "fine-tune" of demo: low-rank deltas on the attention projections of both
                        layers (rank 4 on q/v, rank 8 on o_proj), a nudged norm; the rest unchanged
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent


def seed_rank2() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(10, 2) @ torch.randn(2, 10)  # rank 2
    return {"W": w, "b": torch.randn(10), "x": torch.randn(10)}


def decaying(m: int, n: int, rank: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """U·diag(σ)·Vᵀ with σ_i = exp(−i/τ) over `rank` directions, plus Gaussian noise."""
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator))
    sigma = torch.exp(-torch.arange(rank, dtype=torch.float32) / (rank / 4))
    signal = (u * sigma) @ v.T  # (m, r) @ (r, n) -> (m, n)
    return signal + noise * torch.randn(m, n, generator=generator) / (m * n) ** 0.5


def demo() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    d, ff, vocab = 128, 384, 512
    tensors = {
        "model.embed_tokens.weight": decaying(vocab, d, 48, 0.05, g),
        "model.norm.weight": torch.ones(d) + 0.01 * torch.randn(d, generator=g),
        "model.position_ids": torch.arange(64, dtype=torch.int64),
        "model.conv_stem.weight": decaying(32, 16 * 3 * 3, 12, 0.02, g).reshape(32, 16, 3, 3),
        "model.conv_stem.bias": 0.1 * torch.randn(32, generator=g),
        "lm_head.weight": decaying(vocab, d, 48, 0.05, g),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": decaying(d, d, 32, 0.02, g),
            p + "self_attn.k_proj.weight": decaying(d // 2, d, 16, 0.02, g),
            p + "self_attn.v_proj.weight": decaying(d // 2, d, 24, 0.02, g),
            p + "self_attn.o_proj.weight": decaying(d, d, 40, 0.02, g),
            p + "self_attn.o_proj.bias": 0.1 * torch.randn(d, generator=g),
            p + "mlp.up_proj.weight": decaying(ff, d, 64, 0.03, g),
            p + "mlp.down_proj.weight": decaying(d, ff, 64, 0.03, g),
            p + "input_layernorm.weight": torch.ones(d) + 0.01 * torch.randn(d, generator=g),
        }
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    return tensors


def demo_tuned(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    tuned = dict(base)
    for i in range(2):
        for proj, rank in (("q_proj", 4), ("v_proj", 4), ("o_proj", 8)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            w = base[name]
            delta = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
            tuned[name] = w + 0.02 * delta / rank**0.5
    tuned["model.norm.weight"] = base["model.norm.weight"] * 1.01
    return tuned


if __name__ == "__main__":
    save_file(seed_rank2(), HERE / "seed_rank2.safetensors", metadata={"format": "pt"})
    weights = demo()
    # one metadata key: the writer orders keys at random
    save_file(weights, HERE / "demo.safetensors", metadata={"format": "pt"})
    save_file(demo_tuned(weights), HERE / "demo_tuned.safetensors", metadata={"format": "pt"})
    for name in ("seed_rank2", "demo", "demo_tuned"):
        print(HERE / f"{name}.safetensors")
