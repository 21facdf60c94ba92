"""Running compressed models: low-rank layers, and loading lowrank files into torch and transformers models."""

from lowrank_cli.nn.linear import LowRankEmbedding, LowRankLinear
from lowrank_cli.nn.loading import apply_factors, load_pretrained, save_factors

__all__ = ["LowRankEmbedding", "LowRankLinear", "apply_factors", "load_pretrained", "save_factors"]
