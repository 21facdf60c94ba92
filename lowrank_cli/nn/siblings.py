"""Factored layers that read one input (q/k/v, gate/up) compute their A·x as one matrix product.

q_proj(x), k_proj(x) and v_proj(x) each start with a product by their own A; with the A's stacked
into one (Σr, in) tensor, [A_q; A_k; A_v]·x is one kernel call instead of three, and each layer
takes its rows of the result. Each layer's A stays its own parameter, a view of the stacked
tensor, so the model's names, its state_dict, saving and training are unchanged.

The stacked product is shared only when it is valid: the sibling reads the very tensor (same
object, not changed in place since) that the product was computed from, the A's are still the
views of the stacked tensor (a model moved with `.to()` gets new tensors), and no gradient is
wanted for them (training takes each layer's own product, so each A gets its gradient). A group
whose layers turn out to read different inputs (a cross-attention's query reads the decoder,
its key and value the encoder) stops sharing; every layer then computes its own product.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lowrank_cli.nn.linear import LowRankLinear, linear

# Names of the Linears that one module feeds with one input, by architecture family.
SIBLING_NAMES: tuple[frozenset[str], ...] = tuple(
    frozenset(names)
    for names in (
        ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, OPT, BART
        ("gate_proj", "up_proj"),  # gated MLPs of Llama-style models
        ("query", "key", "value"),  # BERT, RoBERTa, ViT
        ("q_lin", "k_lin", "v_lin"),  # DistilBERT
        ("q", "k", "v"),  # T5
        ("wi_0", "wi_1"),  # T5 v1.1's gated MLP
        ("w1", "w3"),  # Mixtral's experts
        ("to_q", "to_k", "to_v"),  # diffusers' attention
    )
)


class Siblings:
    """Layers that read one input, their A's stacked into one tensor whose rows they view.

    Attributes:
        layers: the LowRankLinear layers, in the order of their rows.
        stacked: (Σr, in) tensor, every layer's A one after the other.
        sharing: False once the layers were seen reading different inputs.
    """

    def __init__(self, layers: list[LowRankLinear]) -> None:
        self.layers = layers
        self.stacked = torch.cat([layer.A.detach() for layer in layers])  # (Σr, in)
        self.rows: dict[LowRankLinear, tuple[int, int]] = {}  # layer -> (first row, rank)
        self.sharing = True
        start = 0
        for layer in layers:
            view = self.stacked[start : start + layer.rank]  # (r, in), rows of the stacked tensor
            layer.A = nn.Parameter(view, requires_grad=layer.A.requires_grad)
            layer.siblings = self
            self.rows[layer] = (start, layer.rank)
            start += layer.rank
        self._views = [(layer, layer.A, layer.A.data_ptr()) for layer in layers]
        self._shared: _Shared | None = None

    def a_product(self, layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor | None:
        """This layer's A·x, from the stacked product (computed now, or by a sibling on the same x);
        None where it cannot be shared: the layer then computes its own."""
        shared = self._shared  # one read: another thread may replace it meanwhile
        if shared is not None:
            if shared.source is x and layer in shared.waiting and shared.version == _version(x):
                shared.waiting.discard(layer)  # (a set: two threads on one input may both get here)
                if not shared.waiting:
                    self._shared = None  # every sibling has its rows: nothing is kept between forwards
                return shared.product.narrow(-1, *self.rows[layer])
            # a sibling did not come for its rows before another input arrived: they do not share it
            self.sharing, self._shared = False, None
        if not self.sharing or not self._usable():
            return None
        product = linear(x, self.stacked)  # (…, in) @ (in, Σr) -> (…, Σr)
        self._shared = _Shared(x, _version(x), product, {other for other in self.layers if other is not layer})
        return product.narrow(-1, *self.rows[layer])

    def _usable(self) -> bool:
        grad = torch.is_grad_enabled()
        for layer, view, pointer in self._views:
            # an A replaced (a new Parameter, or a model moved with .to()): each layer on its own
            if layer._parameters["A"] is not view or view.data_ptr() != pointer:
                return False
            if grad and view.requires_grad:  # training: each layer its own product, so each A gets its gradient
                return False
        return True


class _Shared:
    """The stacked product A·x of one input, kept until every sibling has taken its rows."""

    __slots__ = ("source", "version", "product", "waiting")

    def __init__(self, source: torch.Tensor, version: int | None, product: torch.Tensor, waiting: set) -> None:
        self.source, self.version, self.product, self.waiting = source, version, product, waiting


def _version(x: torch.Tensor) -> int | None:
    """x's in-place change counter; inference tensors have none (and cannot be changed outside inference_mode)."""
    return None if x.is_inference() else x._version


def fuse_siblings(model: nn.Module) -> list[list[str]]:
    """Stack the A factors of sibling layers that read one input, so that their A·x is one product.

    Siblings are the LowRankLinear children of one module named as one of SIBLING_NAMES (q_proj,
    k_proj and v_proj; gate_proj and up_proj; …), with the same input size, dtype and device; two
    or more make a group. Each layer's A becomes a view of the group's stacked tensor (a copy of
    the A's, made once), so parameters, names and outputs are unchanged. A layer whose A another
    module shares (tied weights) is left alone. Calling it again after a model was moved with
    `.to()` stacks the moved A's anew (and lay_out_factors orders the moved B's).

    Args:
        model: any torch model with LowRankLinear layers (load_pretrained calls this).

    Returns:
        The groups formed, each as the layers' names.

    Example:
        >>> fuse_siblings(model)
        [['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', ...], ...]
    """
    holders: dict[int, int] = {}
    for module in model.modules():
        for tensor in module._parameters.values():
            if tensor is not None:
                holders[id(tensor)] = holders.get(id(tensor), 0) + 1
    groups = []
    for parent_name, parent in model.named_modules():
        for layers in _sibling_sets(parent.named_children(), holders):
            Siblings([layer for _, layer in layers])
            groups.append([f"{parent_name}.{name}" if parent_name else name for name, _ in layers])
    return groups


def _sibling_sets(
    children: Iterable[tuple[str, nn.Module]], holders: dict[int, int]
) -> list[list[tuple[str, LowRankLinear]]]:
    layers = [
        (name, child)
        for name, child in children
        if isinstance(child, LowRankLinear) and holders[id(child.A)] == 1 and child.rank > 0
    ]
    sets = []
    for names in SIBLING_NAMES:
        found: dict[tuple, list[tuple[str, LowRankLinear]]] = {}
        for name, layer in layers:
            if name in names:
                key = (layer.in_features, layer.A.dtype, layer.A.device)
                found.setdefault(key, []).append((name, layer))
        sets += [group for group in found.values() if len(group) > 1]
    return sets


__all__ = ["SIBLING_NAMES", "Siblings", "fuse_siblings"]
