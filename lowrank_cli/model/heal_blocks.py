"""heal --blockwise: each compressed block trained to reproduce the reference block's outputs, one block at a time.

The reference and the compressed model both run on the block runner (model.blocks). For block i,
on every training sample:

    X      the block's input: the compressed model's own stream, the output of its blocks 0 … i−1
           as healed (block_inputs="compressed"), or the reference's, the output of the reference's
           blocks 0 … i−1 (block_inputs="reference")
    Y      the reference block i's output on the reference's input
    loss   ‖f′(X) − Y‖² / ‖Y‖² over the real (unmasked) tokens of a batch, f′ the compressed block i

and the factors B, A of block i's factorized layers (and their layers' biases) train with AdamW to
lower it; every other weight is frozen, and the stem and head are not trained: a tied embedding's
factors, which the LM head runs too, stay as they are (an end-to-end heal after this one trains
them). Only one block of each model is in memory at a time; what is kept for all samples is the
reference's stream (X_ref and Y, in the reference's dtype) and, with block_inputs="compressed", the
compressed model's (in float32), each tokens × hidden size numbers, and one block's float32 factors
with their gradients and AdamW's moments. So a model heals in the memory of one block and the
streams, not of two whole models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lowrank_cli.errors import TensorError
from lowrank_cli.io.fileformat import factor_names
from lowrank_cli.model.blocks import Block, BlockRunner, Hidden
from lowrank_cli.model.heal import (
    HealOptions,
    TrainableFactors,
    healed_tensors,
    not_finite_message,
    trainable,
    training_autocast,
)
from lowrank_cli.ops.samples import TextSamples, batches

BLOCK_INPUTS = ("compressed", "reference")  # where block i's inputs come from (module docstring)


@dataclass
class BlockwiseResult:
    """What heal_blocks trained: the healed tensors under their file names (in the file's dtypes) and per block
    the relative error of its outputs on the training samples before and after (on the inputs it trained on)."""

    healed: dict[str, torch.Tensor]
    weights: list[str]  # the factorized weights healed (their records' rel_error is measured again)
    steps: int  # optimizer steps, all blocks together
    final_loss: float  # the mean over blocks of each block's error after healing
    block_errors: list[tuple[float, float]]  # (before, after) per block


def heal_blocks(
    reference: BlockRunner,
    candidate: BlockRunner,
    file_names: set[str],
    dtype_of: Callable[[str], torch.dtype],
    found: TextSamples,
    options: HealOptions,
    *,
    pad: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> BlockwiseResult:
    """Heal the candidate runner's blocks one at a time toward the reference runner's (module docstring).

    Args:
        reference: the reference's BlockRunner, in its own dtype.
        candidate: the compressed model's BlockRunner in float32 (its factors train as they are).
        file_names: the names of the compressed file's tensors; dtype_of: each one's dtype there.
        found: the training samples; options: heal's (steps or epochs are per block).
        pad: the padding token id.
        progress: called as progress(step, steps, running loss) after each step, steps counting every block's.
    """
    runs = batches(found.ids, options.batch_size, str(candidate.device), pad)
    per_block = options.steps or options.epochs * len(runs)
    total = per_block * len(candidate)
    generator = torch.Generator().manual_seed(options.seed)
    reference_stream = [reference.embed(ids, mask) for ids, mask in runs]  # X_ref of block 0, per batch
    own_stream = [candidate.embed(ids, mask) for ids, mask in runs]  # the candidate's calls; X of block 0
    healed: dict[str, torch.Tensor] = {}
    weights: list[str] = []
    errors: list[tuple[float, float]] = []
    done = 0
    for index in range(len(candidate)):
        with reference.load_block(index) as block, torch.no_grad():
            targets = [reference.run_block(block, hidden).states for hidden in reference_stream]  # Y per batch
        with candidate.load_block(index) as block:
            if options.block_inputs == "reference":  # the reference's X, with the candidate's own calls
                inputs = [
                    replace(own, states=ref.states.float())
                    for own, ref in zip(own_stream, reference_stream, strict=True)
                ]
            else:
                inputs = own_stream
            layers = trainable(candidate.model, file_names, within=block.name)
            before = _block_error(candidate, block, inputs, targets)

            def tick(step: int, loss: float, offset: int = done) -> None:
                if progress:
                    progress(offset + step, total, loss)

            _train_block(candidate, block, layers, inputs, targets, options, per_block, generator, tick)
            _round_to_file(layers, dtype_of)  # what follows runs on the factors as written
            after = _block_error(candidate, block, inputs, targets)
            errors.append((before, after))
            healed.update(healed_tensors(layers, dtype_of))
            weights += [layer.name for layer in layers]
            if options.block_inputs == "compressed":
                with torch.no_grad():  # batch by batch in place: never two copies of the stream
                    for k, hidden in enumerate(own_stream):
                        own_stream[k] = candidate.run_block(block, hidden)
            del layers, inputs
        done += per_block
        reference_stream = [replace(hidden, states=y) for hidden, y in zip(reference_stream, targets, strict=True)]
        del targets
    final = sum(after for _, after in errors) / len(errors)
    return BlockwiseResult(healed, weights, total, final, errors)


def _relative_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖y′ − y‖² / ‖y‖² over the real tokens: (batch, seq, d) each, mask (batch, seq)."""
    real = mask.bool()
    y = target[real].float()  # (real tokens, d)
    return (output[real].float() - y).square().sum() / y.square().sum().clamp(min=1e-30)


@torch.no_grad()
def _block_error(runner: BlockRunner, block: Block, inputs: list[Hidden], targets: list[torch.Tensor]) -> float:
    """The block's relative error over all the samples: Σ‖y′ − y‖² / Σ‖y‖² on the real tokens."""
    residual = norm = 0.0
    for hidden, y in zip(inputs, targets, strict=True):
        real = hidden.attention_mask.bool()
        output = runner.run_block(block, hidden).states[real].double()
        residual += float((output - y[real].double()).square().sum())
        norm += float(y[real].double().square().sum())
    return residual / norm if norm > 0 else 0.0


def _train_block(
    runner: BlockRunner,
    block: Block,
    layers: list[TrainableFactors],
    inputs: list[Hidden],
    targets: list[torch.Tensor],
    options: HealOptions,
    steps: int,
    generator: torch.Generator,
    tick: Callable[[int, float], None],
) -> None:
    """AdamW on the block's factors (and biases), the learning rate decaying linearly to 0 over the block's
    steps, gradients clipped to options.max_grad_norm; batches in an order drawn from `generator`."""
    block.module.requires_grad_(False)
    parameters = [parameter for factors in layers for parameter in factors.parameters()]
    if not parameters:  # a block with no factorized layer: nothing of it trains
        tick(steps, float("nan"))
        return
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)  # linear decay to 0
    block.module.train(False)  # no dropout: the reference block runs in eval mode too
    order: list[int] = []
    average = None
    with torch.enable_grad():
        for step in range(steps):
            if step % len(inputs) == 0:  # each pass takes the batches in a new order
                order = torch.randperm(len(inputs), generator=generator).tolist()
            index = order[step % len(inputs)]
            hidden, target = inputs[index], targets[index]
            optimizer.zero_grad(set_to_none=True)
            with training_autocast(str(runner.device)):
                output = runner.run_block(block, hidden).states
                loss = _relative_mse(output, target, hidden.attention_mask)
            value = float(loss.detach())
            if not math.isfinite(value):
                target_finite = bool(torch.isfinite(target).all())
                output_finite = bool(torch.isfinite(output).all())
                why = not_finite_message(value, step, target_finite, output_finite, options.lr)
                raise TensorError(f"{why} (block {block.name})")
            del output
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
            optimizer.step()
            schedule.step()
            average = value if average is None else 0.9 * average + 0.1 * value
            tick(step + 1, average)
    for parameter in parameters:
        parameter.requires_grad_(False)
        parameter.grad = None


@torch.no_grad()
def _round_to_file(layers: list[TrainableFactors], dtype_of: Callable[[str], torch.dtype]) -> None:
    """Each trained factor and bias rounded to its dtype in the file (it stays float32): later blocks' inputs
    are then the outputs of the factors as they will be written."""
    for factors in layers:
        b_name = factor_names(factors.name)[0]
        named = [(b_name, factors.layers[0].B), (b_name, factors.layers[0].A), *factors.biases.items()]
        for name, parameter in named:
            parameter.copy_(parameter.to(dtype_of(name)))


def open_runners(folder: Path, compressed: Path, device: str) -> tuple[BlockRunner, BlockRunner]:
    """The reference's runner in its own dtype (as evaluate runs it) and the compressed model's in float32."""
    from lowrank_cli.model.blockwise import candidate_runner, open_runner

    reference = open_runner(folder, device=device)
    try:
        return reference, candidate_runner(folder, compressed, reference, torch.float32)  # fits the reference's class
    except BaseException:
        reference.close()
        raise
