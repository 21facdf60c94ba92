"""Model-level work: models run on real text (evaluate, compress to a fidelity target, heal), whole or
block by block in the memory of one block (blocks.BlockRunner).

Above nn in the layering (errors → linalg, io → ops → nn → model → api → cli): it builds models with
nn.loading and runs them.
"""
