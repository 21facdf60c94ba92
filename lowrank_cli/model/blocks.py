"""Running a transformers model one block at a time, in the memory of one block.

A transformer is a stem (embeddings, rotary tables, masks), a stack of repeated blocks (decoder or
encoder layers) and a head (final norm, LM head). BlockRunner builds the model of a folder's
config.json on the meta device (no weight allocated), then:

    embed       runs the stem on a batch of token ids, as the model's own forward does, and records
                what the model passes to every block besides the hidden states (attention masks,
                rotary cos/sin of each layer type, position ids): each block is called later with
                exactly those arguments, so masks and positions are the model's own
    blocks      materializes one block at a time from the safetensors files (memory-mapped), and
                returns it to the meta device when the loop moves on
    run_block   runs a batch's hidden states through the block in hand
    head        runs the head on final hidden states (any slice of positions), as the model's forward does

The stem's and head's tensors load on their module's first call; a tied embedding is one tensor,
loaded once. How the model's forward calls its blocks is learnt the way GPTQ's "Catcher" learns it:
every block is swapped for a stub that records its arguments and hands the hidden states on
unchanged, and the last one stops the forward before the head.

    runner = BlockRunner("SmolLM2/", dtype=torch.float32)
    hidden = [runner.embed(ids, mask) for ids, mask in batches]
    for block in runner.blocks():
        hidden = [runner.run_block(block, h) for h in hidden]
    logits = runner.head(hidden[0])
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lowrank_cli.errors import CheckpointError
from lowrank_cli.io.checkpoint import open_checkpoint
from lowrank_cli.nn.loading import LoadResult, build_empty, factored_names, load_tensors


@dataclass(frozen=True)
class Call:
    """What the model passes one block besides its hidden states."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict  # keyword arguments (attention_mask, position_embeddings, position_ids, …)
    keyword: str | None = None  # the hidden states' keyword, when the model passes them by name


@dataclass(frozen=True)
class Hidden:
    """One batch of samples between two blocks."""

    states: torch.Tensor  # (batch, seq, d): the input of the next block, in the compute dtype
    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq): 1 for a token, 0 for padding
    calls: tuple[Call, ...]  # calls[i]: what block i is called with for this batch


@dataclass(frozen=True)
class Block:
    """A block in hand: its place in the stack and the materialized module."""

    index: int
    name: str  # the module's name in the model ("model.layers.3")
    module: nn.Module


class _Stop(Exception):
    """Raised by the last block's stub: the forward has told every block what it passes."""


class _Stub(nn.Module):
    def __init__(self, forward) -> None:
        super().__init__()
        self._forward = forward

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


class BlockRunner:
    """A transformers model run block by block: one block's weights in memory at a time.

    Args:
        folder: a Hugging Face model folder (config.json and safetensors weights).
        weights: the safetensors file or folder to load the tensors from, when not `folder`'s own:
            a lowrank file's factored weights run as factors (LowRankLinear).
        device: where blocks, stem and head run ("cpu", "cuda").
        dtype: the compute dtype of every floating-point tensor and of the hidden states.
        states_device: where the hidden states wait between blocks (default: `device`).

    Attributes:
        model: the model, built on the meta device; its blocks are meta except the one in hand.
        blocks_name: the name of the stack of blocks in the model ("model.layers").
        unexpected_keys: the weights' tensors that match nothing in the model (left out).

    Example:
        >>> with BlockRunner("SmolLM2/") as runner:
        ...     hidden = runner.embed(ids, mask)
        ...     for block in runner.blocks():
        ...         hidden = runner.run_block(block, hidden)
        ...     logits = runner.head(hidden)  # (batch, seq, vocabulary), as model(ids, mask).logits
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        states_device: str | torch.device | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.device, self.dtype = torch.device(device), dtype
        self.states_device = torch.device(states_device) if states_device is not None else self.device
        self.model = build_empty(self.folder, feature="the block runner")
        config = self.model.config
        if getattr(config, "is_encoder_decoder", False):
            raise CheckpointError(
                f"{self.folder}: is an encoder-decoder model ({type(self.model).__name__}), whose decoder blocks"
                " need the encoder's outputs; the block runner runs one stack of blocks"
            )
        config.use_cache = False  # no key/value cache: every block sees the whole sequence once
        self.model.eval().requires_grad_(False)
        self.blocks_name, self._stack = find_blocks(self.model, self.folder)
        self._templates = list(self._stack)  # the meta blocks, copied to materialize one
        self._in_hand: int | None = None
        self._checkpoint = open_checkpoint(weights or self.folder)
        # Loading nothing matches the file's names to the whole model's: its extra tensors are known now.
        self.unexpected_keys = load_tensors(self.model, self._checkpoint, []).unexpected_keys
        # A module whose weight the file holds as factors is replaced by a low-rank one as it loads, which
        # cannot happen during its own call: those load now (factors are small), the rest on first call.
        outside = [name for name in factored_names(self.model, self._checkpoint) if not self._inside(name)]
        if outside:
            self._load("the stem and head", outside)
        self._hooks = []
        for name, module in self._outside():
            _compute_buffers(self.model, module, self.device)
            if any(t.is_meta for t in _own_tensors(module, persistent=True)):
                self._load_on_call(name, module)

    # --- the passes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Hidden:
        """The stem's output for one batch: the hidden states entering the first block, and every block's call.

        Args:
            input_ids: (batch, seq) token ids.
            attention_mask: (batch, seq), 1 for a token and 0 for padding (default: no padding).
        """
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        calls: list[Call] = []
        handed: list[torch.Tensor] = []

        def record(*args, **kwargs):
            states, call = _split(args, kwargs)
            if handed and states is not handed[-1]:
                raise CheckpointError(
                    f"{self.folder}: {type(self.model).__name__} changes the hidden states between its blocks"
                    f" ('{self.blocks_name}'), so its blocks cannot run one after another; the block runner"
                    " does not support this model"
                )
            calls.append(call)
            handed.append(states)
            if len(calls) == len(self._templates):
                raise _Stop
            return states

        with self._stubs(lambda _: record), suppress(_Stop):
            self.model(input_ids=ids, attention_mask=mask)
        if len(calls) != len(self._templates):
            raise CheckpointError(
                f"{self.folder}: its forward called {len(calls)} of the {len(self._templates)} blocks of"
                f" '{self.blocks_name}'; the block runner needs a model that runs every block once"
            )
        states = handed[0].to(device=self.states_device, dtype=self.dtype)
        return Hidden(states, ids, mask, tuple(calls))

    def run_block(self, block: Block, hidden: Hidden) -> Hidden:
        """The batch's hidden states after `block`, called as the model calls it; the grad mode is the caller's."""
        call = hidden.calls[block.index]
        states = hidden.states.to(self.device)
        if call.keyword is None:
            output = block.module(states, *call.args, **call.kwargs)
        else:
            output = block.module(*call.args, **{call.keyword: states}, **call.kwargs)
        return replace(hidden, states=output.to(self.states_device))

    def head(self, hidden: Hidden, positions: slice | None = None) -> torch.Tensor:
        """The model's output for final hidden states (after the last block), as its forward computes it.

        The logits of an LM (the final norm, the LM head, any soft-capping), else the last hidden
        state (an encoder's, after any final norm). The stem runs again on the batch's ids (a cheap
        lookup, discarded) so that the head is the model's own code; the blocks do not run.

        Args:
            hidden: the last block's output (run_block).
            positions: only these positions (a chunk of the sequence, to bound the logits' memory);
                valid for heads that act on each position alone (LM heads, final norms).

        Returns:
            (batch, seq or len(positions), vocabulary or d), on the runner's device.
        """
        states, ids, mask = hidden.states, hidden.input_ids, hidden.attention_mask
        if positions is not None:
            states, ids, mask = states[:, positions], ids[:, positions], mask[:, positions]
        states = states.to(self.device)

        def first(*args, **kwargs):
            return states

        def after(*args, **kwargs):
            return _split(args, kwargs)[0]

        with self._stubs(lambda index: first if index == 0 else after):
            output = self.model(input_ids=ids, attention_mask=mask)
        logits = getattr(output, "logits", None)
        if logits is not None:
            return logits
        last = getattr(output, "last_hidden_state", None)
        return last if last is not None else output[0]

    # --- the blocks -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._templates)

    def blocks(self) -> Iterator[Block]:
        """Every block in order, materialized one at a time; each is freed when the loop moves on."""
        for index in range(len(self._templates)):
            with self.load_block(index) as block:
                yield block

    @contextmanager
    def load_block(self, index: int) -> Iterator[Block]:
        """Block `index` materialized (its weights in the compute dtype on the device) for the `with` body.

        The module is a fresh copy of the meta block with the file's tensors; weights the file holds
        as factors run as LowRankLinear. Leaving the `with` puts the meta block back, so nothing of
        the block stays in memory. One block at a time: loading a second while one is in hand is an error.
        """
        if self._in_hand is not None:
            raise RuntimeError(f"block {self._in_hand} is still in hand; leave its `with` first")
        module = copy.deepcopy(self._templates[index])
        self._stack[index] = module
        self._in_hand = index
        name = f"{self.blocks_name}.{index}"
        try:
            self._load(name, [f"{name}.{key}" for key in module.state_dict()])
            for child in module.modules():
                _compute_buffers(self.model, child, self.device)
            yield Block(index, name, module)
        finally:
            self._stack[index] = self._templates[index]
            self._in_hand = None
            del module
            # the file's pages this block touched (weights kept in the file's dtype are mapped) leave the
            # resident set with it: otherwise a pass over every block would end up holding the whole file
            self._checkpoint.release([key for key in self._checkpoint.entries if _within(key, name)])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._checkpoint.close()

    def __enter__(self) -> BlockRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- loading ----------------------------------------------------------------------------------------

    def _load(self, what: str, names: list[str]) -> LoadResult:
        result = load_tensors(self.model, self._checkpoint, names, dtype=self.dtype, device=self.device)
        if result.missing_keys:
            missing = result.missing_keys
            some = ", ".join(f"'{n}'" for n in missing[:3]) + (", …" if len(missing) > 3 else "")
            raise CheckpointError(
                f"{self._checkpoint.source}: has no tensor for {some} of {what} ({len(missing)} missing);"
                f" give the weights of the model of {self.folder / 'config.json'}"
            )
        return result

    def _inside(self, name: str) -> bool:
        return name == self.blocks_name or name.startswith(self.blocks_name + ".")

    def _outside(self) -> list[tuple[str, nn.Module]]:
        """The modules of the stem and head (not in the stack of blocks)."""
        return [(name, module) for name, module in self.model.named_modules() if not self._inside(name)]

    def _load_on_call(self, name: str, module: nn.Module) -> None:
        """Load the module's own tensors on its first call (a forward pre-hook that then removes itself)."""

        def load(*_):
            handle.remove()
            meta = {id(t) for t in _own_tensors(module, persistent=True) if t.is_meta}
            names = [key for key, t in self.model.state_dict(keep_vars=True).items() if id(t) in meta]
            if names:  # a tied tensor may have come with another module already
                self._load(f"'{name}'", names)

        handle = module.register_forward_pre_hook(load)
        self._hooks.append(handle)

    @contextmanager
    def _stubs(self, make):
        """Every block swapped for _Stub(make(index)) for the `with` body, then put back."""
        saved = list(self._stack)
        for index in range(len(saved)):
            self._stack[index] = _Stub(make(index))
        try:
            yield
        finally:
            for index, module in enumerate(saved):
                self._stack[index] = module


def find_blocks(model: nn.Module, folder: Path | str = "") -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: the nn.ModuleList of one module class holding the most parameters.

    Decoder layers (Llama, Qwen2, Gemma3: model.layers), GPT-2's transformer.h, BERT's
    encoder.layer. A block must share no tensor with the rest of the model or another block.
    """
    stacks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(child) for child in module}) == 1:
            stacks.append((sum(p.numel() for p in module.parameters()), name, module))
    if not stacks:
        raise CheckpointError(
            f"{folder}: {type(model).__name__} has no stack of repeated blocks (an nn.ModuleList of one layer"
            " class); the block runner runs transformer layers"
        )
    _, name, stack = max(stacks, key=lambda item: item[0])
    owner: dict[int, str] = {}
    for index, block in enumerate(stack):
        for tensor in [*block.parameters(), *block.buffers()]:
            owner[id(tensor)] = f"{name}.{index}"
    inside = name + "."
    for tensor_name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        where = owner.get(id(tensor))
        if where is not None and not tensor_name.startswith(where + "."):
            raise CheckpointError(
                f"{folder}: tensor '{tensor_name}' is shared with block '{where}'"
                f"{'' if tensor_name.startswith(inside) else ' from outside the blocks'}; the block runner"
                " loads blocks one at a time and needs each to hold its own tensors"
            )
    return name, stack


def _within(key: str, block: str) -> bool:
    """Whether the file's tensor `key` is of the block named `block` (model.layers.3), allowing a prefix (bert.)."""
    return key.startswith(block + ".") or f".{block}." in key


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Call]:
    """A block's call as (hidden states, everything else)."""
    if args:
        return args[0], Call(tuple(args[1:]), dict(kwargs))
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), Call((), kwargs, "hidden_states")


def _own_tensors(module: nn.Module, *, persistent: bool) -> list[torch.Tensor]:
    """The module's own parameters and buffers (not its children's); persistent: leave out non-persistent buffers."""
    tensors = [t for t in module._parameters.values() if t is not None]
    for name, buffer in module._buffers.items():
        if buffer is not None and not (persistent and name in module._non_persistent_buffers_set):
            tensors.append(buffer)
    return tensors


def _compute_buffers(model: nn.Module, module: nn.Module, device: torch.device) -> None:
    """The module's own non-persistent buffers (rotary frequencies, position ids, embedding scales), which
    no file holds and a meta build leaves without values, computed as transformers' loading computes them:
    by the model's _init_weights on that module, every other tensor marked as initialized."""
    meta = [name for name in module._non_persistent_buffers_set if getattr(module, name, None) is not None]
    meta = [name for name in meta if module._buffers[name].is_meta]
    if not meta:
        return
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    for name in meta:
        buffer = module._buffers[name]
        placeholder = float("nan") if buffer.is_floating_point() else -1
        module._buffers[name] = torch.full(buffer.shape, placeholder, dtype=buffer.dtype, device=device)
    new = {id(module._buffers[name]) for name in meta}
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    others = list({id(t): t for t in own if id(t) not in new}.values())
    for tensor in others:
        tensor._is_hf_initialized = True
    owner = _pretrained_owner(model, module, PreTrainedModel)
    try:
        with torch.no_grad(), guard_torch_init_functions():
            owner._init_weights(module)
    finally:
        for tensor in others:
            del tensor._is_hf_initialized
    for name in meta:
        buffer = module._buffers[name]
        unset = buffer.isnan() if buffer.is_floating_point() else buffer == -1
        if buffer.numel() and bool(unset.all()):
            raise CheckpointError(
                f"{type(model).__name__}: buffer '{name}' of {type(module).__name__} is not computed by transformers'"
                " initialization, so the block runner cannot rebuild it; this model is not supported"
            )


def _pretrained_owner(model: nn.Module, module: nn.Module, pretrained: type) -> nn.Module:
    """The innermost transformers PreTrainedModel holding `module` (a composite model's sub-model has its own init)."""
    names = {id(m): name for name, m in model.named_modules()}
    path = names[id(module)]
    owners = [(name, m) for name, m in model.named_modules() if isinstance(m, pretrained)]
    held = [(name, m) for name, m in owners if not name or path == name or path.startswith(name + ".")]
    return max(held, key=lambda item: len(item[0]))[1] if held else model
