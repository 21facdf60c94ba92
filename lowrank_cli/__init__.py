"""lowrank: the low-rank structure of neural-network weights in safetensors files."""

__version__ = "0.1.0"
