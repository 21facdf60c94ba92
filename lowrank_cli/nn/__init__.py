"""Running compressed models: low-rank layers, and loading lowrank files into torch and transformers models."""

from lowrank_cli.nn.linear import LowRankEmbedding, LowRankLinear, lay_out_factors
from lowrank_cli.nn.loading import LoadResult, apply_factors, load_pretrained, load_sentence_transformer, save_factors
from lowrank_cli.nn.siblings import fuse_siblings

__all__ = [
    "LoadResult",
    "LowRankEmbedding",
    "LowRankLinear",
    "apply_factors",
    "fuse_siblings",
    "lay_out_factors",
    "load_pretrained",
    "load_sentence_transformer",
    "save_factors",
]
