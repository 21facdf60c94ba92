"""Running compressed models: low-rank layers, and loading lowrank files into torch and transformers models."""

from lowrank_cli.nn.linear import LowRankEmbedding, LowRankLinear
from lowrank_cli.nn.loading import DependencyError, apply_factors, load_pretrained, save_factors

__all__ = ["DependencyError", "LowRankEmbedding", "LowRankLinear", "apply_factors", "load_pretrained", "save_factors"]
