"""Model-level work: the whole model run on real text (evaluate, compress to a fidelity target).

Above nn in the layering (errors → linalg, io → ops → nn → model → api → cli): it builds models with
nn.loading and runs them.
"""
