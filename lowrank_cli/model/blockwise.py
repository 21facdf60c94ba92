"""evaluate and compress --fidelity block by block: the reference's final hidden states kept, never its log-probs.

A causal LM, a masked LM or an encoder (model.evaluate's kinds) runs on the block runner
(model.blocks): the reference's blocks run once over every sample, and what is kept of it is the
last block's output, (tokens, d) numbers, not the (tokens, vocabulary) log-probabilities. A
candidate then runs its own stem and blocks, one block in memory at a time, and both models' heads
run on the two sets of final hidden states a chunk of positions at a time (CHUNK_ELEMENTS numbers
per vocabulary-wide tensor), where KL(reference ‖ candidate), perplexities and top-1 agreement
are summed as evaluate.Evaluator sums them. An encoder keeps the reference's pooled embeddings.

Peak memory: one block of one model, the stem and head of both, two sets of hidden states (the
reference's final ones and the candidate's between two blocks) and one chunk of logits.

compress --fidelity's trials run the same way (BlockwiseEvaluator.measure with `edit`): each block
is loaded from the reference's weights and given the trial's W′ = B·A before it runs, so a trial
never touches the reference or its kept outputs. Models the runner does not run (task heads, an
architecture it refuses) are measured whole, by evaluate.Evaluator (`open_evaluator` decides).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, UsageError, arg
from lowrank_cli.io.checkpoint import Checkpoint, open_checkpoint
from lowrank_cli.io.dtypes import torch_dtype
from lowrank_cli.model.blocks import Block, BlockRunner, Hidden
from lowrank_cli.model.evaluate import (
    CAUSAL_LM,
    ENCODER,
    MASKED_LM,
    MISFIT_FIX,
    Evaluator,
    eval_batches,
    exp_or_inf,
    is_lowrank,
    load_candidate,
    make_evaluator,
    model_kind,
    model_samples,
    pool,
    read_pooling,
    require_finite,
)
from lowrank_cli.ops.samples import TextSamples
from lowrank_cli.ops.settings import EVALUATE_BATCH_SIZE

BLOCKWISE_KINDS = (CAUSAL_LM, MASKED_LM, ENCODER)
CHUNK_ELEMENTS = 1 << 22  # numbers in one chunk's (batch, positions, vocabulary) logits: 16 MB in float32


class BlockwiseEvaluator:
    """The reference's final hidden states on fixed samples, and the figures of any candidate runner against them.

    Args:
        runner: the reference's BlockRunner (its stem and head stay loaded; its blocks load one at a time).
        samples, kind, pad, mask_token, special, pooling, batch_size: as evaluate.Evaluator's.

    Attributes:
        final: per batch, the reference's last block's output (the Hidden the head reads); for an
            encoder, None (its pooled embeddings are kept in `pooled` instead).
    """

    def __init__(
        self,
        runner: BlockRunner,
        samples: TextSamples,
        *,
        kind: str,
        pad: int,
        mask_token: int | None = None,
        special: set[int] | None = None,
        pooling: str = "mean",
        batch_size: int = EVALUATE_BATCH_SIZE,
    ) -> None:
        self.runner, self.samples, self.kind, self.pooling = runner, samples, kind, pooling
        self.batches = eval_batches(samples, kind, pad, mask_token, special, batch_size, str(runner.device))
        hidden = self._run(runner)
        if kind == ENCODER:  # (batch, d) each: the pooled embeddings are all a candidate is compared with
            self.pooled = [self._pooled(runner, h) for h in hidden]
            self.final: list[Hidden] | None = None
        else:
            self.final = hidden

    def _run(self, runner: BlockRunner, edit: Callable[[Block], None] | None = None) -> list[Hidden]:
        """Every batch through the runner's stem and blocks, one block at a time; each batch's states replaced."""
        hidden = [runner.embed(batch[0], batch[1]) for batch in self.batches]
        with torch.no_grad():
            for block in runner.blocks():
                if edit is not None:
                    edit(block)
                for index, states in enumerate(hidden):
                    hidden[index] = runner.run_block(block, states)
        return hidden

    def _pooled(self, runner: BlockRunner, hidden: Hidden) -> torch.Tensor:
        with torch.no_grad():
            return pool(runner.head(hidden), hidden.attention_mask, self.pooling)

    def measure(self, candidate: BlockRunner, edit: Callable[[Block], None] | None = None) -> dict[str, float]:
        """The figures of the candidate runner (same tokenizer and kind as the reference), as Evaluator.measure's.

        edit: called on each of the candidate's blocks once it is loaded, before any sample runs through it
        (compress --fidelity puts a trial's weights into it); the block is freed after, so nothing stays.
        """
        hidden = self._run(candidate, edit)
        if self.kind == ENCODER:
            cosines, nonfinite = [], 0
            for h, reference in zip(hidden, self.pooled, strict=True):
                require_finite(reference)
                output = self._pooled(candidate, h)
                nonfinite += int((~torch.isfinite(output)).any(dim=-1).sum())
                cosines.append(torch.nn.functional.cosine_similarity(output, reference, dim=-1, eps=1e-30))
            values = torch.cat(cosines).to(torch.float64)
            mean = float(values.mean())
            return {
                "fidelity": mean,
                "cosine_mean": mean,
                "cosine_p5": float(torch.quantile(values, 0.05)),
                "cosine_min": float(values.min()),
                "nonfinite": nonfinite,
            }
        sums = _Sums()
        for batch, reference, output in zip(self.batches, self.final, hidden, strict=True):
            self._compare(batch, reference, output, candidate, sums)
        return sums.figures()

    @torch.no_grad()
    def _compare(self, batch: tuple, reference: Hidden, output: Hidden, candidate: BlockRunner, sums: _Sums) -> None:
        """One batch's KL, agreement and likelihoods, through both heads a chunk of positions at a time."""
        ids, mask = batch[:2]
        if self.kind == CAUSAL_LM:  # position t predicts token t + 1; the last position predicts nothing
            after = torch.zeros_like(mask[:, :1])
            where = (mask * torch.cat([mask[:, 1:], after], dim=1)).bool()
            targets = torch.cat([ids[:, 1:], after.to(ids.dtype)], dim=1)
        else:  # masked LM: the masked positions and their true tokens
            where, targets = batch[2], batch[3]
        rows, length = ids.shape
        width = _vocabulary(self.runner)
        step = max(1, CHUNK_ELEMENTS // max(1, rows * width))
        for start in range(0, length, step):
            positions = slice(start, min(length, start + step))
            chosen = where[:, positions]
            if not bool(chosen.any()):
                continue
            p = torch.log_softmax(self.runner.head(reference, positions).to(torch.float32), dim=-1)[chosen]
            q = torch.log_softmax(candidate.head(output, positions).to(torch.float32), dim=-1)[chosen]
            sums.add(p, q, targets[:, positions][chosen])  # (positions, V) log-probabilities each


class _Sums:
    """KL, agreement and negative log-likelihoods summed over positions, as Evaluator.measure sums them: a
    reference that is not finite is refused, a candidate's positions that are not are counted (nonfinite)."""

    def __init__(self) -> None:
        self.kl = self.agree = self.nll_ref = self.nll_cand = 0.0
        self.positions = self.nonfinite = 0

    def add(self, p: torch.Tensor, q: torch.Tensor, targets: torch.Tensor) -> None:
        require_finite(p)
        self.nonfinite += int((~torch.isfinite(q)).any(dim=-1).sum())
        self.kl += float((p.exp() * (p - q)).sum(dtype=torch.float64))
        self.agree += float((p.argmax(dim=-1) == q.argmax(dim=-1)).sum())
        self.nll_ref -= float(p.gather(1, targets[:, None]).sum(dtype=torch.float64))
        self.nll_cand -= float(q.gather(1, targets[:, None]).sum(dtype=torch.float64))
        self.positions += int(targets.numel())

    def figures(self) -> dict[str, float]:
        if self.positions == 0:
            raise UsageError(f"the samples leave no position to compare; give longer text or raise {arg('seq_len')}")
        mean_kl = max(self.kl / self.positions, 0.0)
        return {
            "fidelity": math.exp(-mean_kl),
            "positions": self.positions,
            "perplexity_reference": exp_or_inf(self.nll_ref / self.positions),
            "perplexity_candidate": exp_or_inf(self.nll_cand / self.positions),
            "kl_mean": mean_kl,
            "top1_agreement": self.agree / self.positions,
            "nonfinite": self.nonfinite,
        }


def _vocabulary(runner: BlockRunner) -> int:
    """The width of the head's output: the LM's vocabulary."""
    head = runner.model.get_output_embeddings() if hasattr(runner.model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(getattr(runner.model.config, "vocab_size", 0) or 1 << 16)


def weights_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The floating-point dtype that holds most of the checkpoint's numbers: what transformers' dtype="auto"
    runs a model in (8-bit floats, which nothing computes in, run in float32)."""
    counts: dict[str, int] = {}
    for entry in checkpoint.entries.values():
        if entry.is_float:
            counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.numel
    if not counts:
        return torch.float32
    code = max(counts, key=counts.__getitem__)
    return torch.float32 if code.startswith("F8") else torch_dtype(code)


def open_runner(
    folder: Path, *, weights: Path | None = None, device: str = "cpu", dtype: torch.dtype | None = None
) -> BlockRunner:
    """A BlockRunner computing in `dtype`, by default the weights' own (as the whole model would load)."""
    if dtype is None:
        with open_checkpoint(weights or folder) as checkpoint:
            dtype = weights_dtype(checkpoint)
    return BlockRunner(folder, weights=weights, device=device, dtype=dtype)


def candidate_runner(
    folder: Path, candidate: Path, reference: BlockRunner, dtype: torch.dtype | None = None
) -> BlockRunner:
    """The candidate on the block runner, found as evaluate.load_candidate finds it: a folder with its own
    config.json runs by it, a lowrank file or folder of shards by the reference's config. dtype: the compute
    dtype (default: its weights' own)."""
    own_config = candidate.is_dir() and (candidate / "config.json").is_file()
    if not own_config and not is_lowrank(candidate):
        raise CheckpointError(
            f"{candidate}: is neither a lowrank file nor a model folder with config.json; give a compressed"
            " model (lowrank compress) or a Hugging Face folder"
        )
    runner = (
        open_runner(candidate, device=str(reference.device), dtype=dtype)
        if own_config
        else open_runner(folder, weights=candidate, device=str(reference.device), dtype=dtype)
    )
    expected = type(reference.model).__name__
    fix = MISFIT_FIX if is_lowrank(candidate) else "give the reference's own compressed or fine-tuned model"
    if type(runner.model).__name__ != expected or runner.blocks_name != reference.blocks_name:
        runner.close()
        raise CheckpointError(
            f"{candidate}: does not fit {expected}, the reference's class: it is a {type(runner.model).__name__}; {fix}"
        )
    if runner.unexpected_keys and is_lowrank(candidate):
        name, count = runner.unexpected_keys[0], len(runner.unexpected_keys)
        runner.close()
        raise CheckpointError(
            f"{candidate}: does not fit {expected}: it holds tensor '{name}' ({count} in all) that {expected}"
            f" has not; {fix}"
        )
    return runner


def open_evaluator(
    folder: Path,
    text: str | Path,
    *,
    feature: str,
    batch_size: int,
    device: str,
    **sampling,
) -> tuple[BlockwiseEvaluator | Evaluator, TextSamples]:
    """The evaluator of the reference folder on samples of `text`: block by block where the runner runs
    the model (BLOCKWISE_KINDS), else the whole model loaded (evaluate.Evaluator). sampling: model_samples'."""
    from lowrank_cli.io.hfconfig import require_transformers
    from lowrank_cli.ops.hfmodel import load_model, pad_id, refuse_lowrank_weights

    require_transformers(feature)  # the missing extra named by the feature asked for, not by the runner
    refuse_lowrank_weights(folder)
    runner = kind = None
    try:
        runner = open_runner(folder, device=device)
        kind = model_kind(runner.model)
    except CheckpointError:  # a model the runner refuses: measured whole below (which says if the folder is bad)
        pass
    if kind in BLOCKWISE_KINDS:
        tokenizer = load_tokenizer(folder, feature)
        found = model_samples(runner.model, tokenizer, folder, text, **sampling)
        try:
            evaluator = BlockwiseEvaluator(
                runner, found, kind=kind, pad=pad_id(tokenizer),
                mask_token=getattr(tokenizer, "mask_token_id", None),
                special=set(getattr(tokenizer, "all_special_ids", []) or []),
                pooling=read_pooling(folder) if kind == ENCODER else "mean", batch_size=batch_size,
            )  # fmt: skip
            return evaluator, found
        except CheckpointError:  # its forward does not call its blocks one after another: measured whole below
            pass
    if runner is not None:
        runner.close()
    reference, tokenizer = load_model(folder, device, feature)
    found = model_samples(reference, tokenizer, folder, text, **sampling)
    return make_evaluator(reference, tokenizer, found, folder, batch_size=batch_size, device=device), found


def measure_candidate(evaluator: BlockwiseEvaluator | Evaluator, folder: Path, candidate: Path) -> dict[str, float]:
    """The candidate's figures against the evaluator's reference, run as the reference runs (blocks or whole)."""
    if isinstance(evaluator, BlockwiseEvaluator):
        runner = candidate_runner(folder, candidate, evaluator.runner)
        try:
            return evaluator.measure(runner)
        finally:
            runner.close()
    device = str(evaluator.batches[0][0].device)
    return evaluator.measure(load_candidate(folder, candidate, type(evaluator.reference), device))


def load_tokenizer(folder: Path, feature: str):
    """The folder's tokenizer, offline, never running the folder's own code."""
    from lowrank_cli.io.hfconfig import config_errors, require_transformers

    transformers = require_transformers(feature)
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except config_errors() as exc:
        raise CheckpointError(f"{folder}: cannot be loaded with transformers ({exc})".splitlines()[0]) from None
