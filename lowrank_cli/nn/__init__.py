"""Running compressed models: low-rank layers, and loading lowrank files into torch and transformers models."""

from lowrank_cli.nn.linear import LowRankEmbedding, LowRankLinear
from lowrank_cli.nn.loading import LoadResult, apply_factors, load_pretrained, load_sentence_transformer, save_factors

__all__ = [
    "LoadResult",
    "LowRankEmbedding",
    "LowRankLinear",
    "apply_factors",
    "load_pretrained",
    "load_sentence_transformer",
    "save_factors",
]
