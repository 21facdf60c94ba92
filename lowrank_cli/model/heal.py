"""heal: train a compressed model's factors back toward the original model, at the same size.

Closed-form truncation has a ceiling; a short distillation pass lifts it. Every factor B, A of the
compressed model (and the bias of each factorized Linear) is trained with AdamW to make the
compressed model's outputs match the reference's on samples of a text; every other weight stays
frozen, and the reference runs under no_grad, so only the factors carry gradients and optimizer
state. The loss, by model kind (model.evaluate):

    encoder       ‖h′ − h‖² / ‖h‖² of the hidden states over the real tokens (relative MSE), the mean
                  over the embedding output and every layer's: on all-MiniLM-L6-v2 it healed further
                  than the last layer's alone (benchmarks/README.md)
    causal-lm     mean KL(reference ‖ candidate) of the next-token distributions per token
    masked-lm     the same at every position of the unmasked input
    token-classifier     the same over the class distributions of every real token
    sequence-classifier  mean KL of the class distributions per sample

The output is the compressed checkpoint again, shard for shard: every tensor under its own name,
shape and dtype, the trained factors and biases in place of the old, each factor record's
rel_error measured anew against the reference's W on what is written, and a `heal` entry in the
lowrank metadata (text hash, steps, final loss, learning rate, seed).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, TensorError, UsageError, arg
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.fileformat import METADATA_KEY, decode_metadata, factor_names, factor_records
from lowrank_cli.io.hfconfig import base_prefix, prefix_variants
from lowrank_cli.io.outputs import CheckpointOutput, prepare_output
from lowrank_cli.linalg.factorize import relative_error
from lowrank_cli.model.evaluate import CAUSAL_LM, ENCODER, SEQUENCE_CLASSIFIER, model_kind, next_token_pairs
from lowrank_cli.nn.linear import LowRankEmbedding, LowRankLinear
from lowrank_cli.ops.hfmodel import load_model, pad_id
from lowrank_cli.ops.report import Report, Status, TensorReport, Totals
from lowrank_cli.ops.samples import TextSamples, batches
from lowrank_cli.ops.settings import (
    HEAL_BATCH_SIZE,
    HEAL_EPOCHS,
    HEAL_LR,
    HEAL_MAX_GRAD_NORM,
    HEAL_TOKENS,
    SEQ_LEN,
)

SUFFIX = ".healed.safetensors"
TARGET_CACHE_BYTES = 1 << 31  # an encoder's reference hidden states kept across passes up to this size (_Targets)


@dataclass(frozen=True)
class HealOptions:
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the samples
    epochs: int = HEAL_EPOCHS
    lr: float = HEAL_LR
    batch_size: int = HEAL_BATCH_SIZE
    seed: int = 0
    max_grad_norm: float = HEAL_MAX_GRAD_NORM  # the factors' gradients are clipped to this norm each step
    blockwise: bool = False  # each block toward the reference's block, one at a time (model.heal_blocks)
    block_inputs: str = "compressed"  # blockwise: block i's inputs, the compressed model's stream or the reference's

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"{arg('steps')} must be at least 1, got {self.steps}")
        if self.epochs < 1:
            raise UsageError(f"{arg('epochs')} must be at least 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"{arg('lr')} must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise UsageError(f"{arg('batch_size')} must be at least 1, got {self.batch_size}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            # a library option only (no flag): named as Python spells it
            raise UsageError(f"max_grad_norm must be a positive number, got {self.max_grad_norm}")
        if self.block_inputs not in ("compressed", "reference"):
            raise UsageError(f"block_inputs must be 'compressed' or 'reference', got {self.block_inputs!r}")


@dataclass
class TrainableFactors:
    """One factorized weight of the model: the factors B, A that its layers run (tied weights, an embedding
    and the LM head, are several layers sharing one B and one A), and the names they have in the file."""

    name: str  # the weight's name in the file (NAME.B, NAME.A hold its factors)
    layers: list[LowRankLinear | LowRankEmbedding]  # every layer running these factors
    biases: dict[str, torch.nn.Parameter]  # the file's name -> the bias of a layer with one

    @property
    def transposed(self) -> bool:
        """The file holds Wᵀ = Aᵀ·Bᵀ (GPT-2's Conv1D, nn.loading)."""
        return bool(getattr(self.layers[0], "transposed", False))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.layers[0].B, self.layers[0].A, *self.biases.values()]


def trainable(model: torch.nn.Module, file_names: set[str], *, within: str | None = None) -> list[TrainableFactors]:
    """Every factorized weight of `model`, once however many layers share it, with its names in the file.

    within: only the layers under this module of the model ("model.layers.3", a block).

    Tied weights are one tensor: layers are grouped by their B, so an embedding and the LM head tied
    to it are one TrainableFactors whose name is the one the file holds. Factors and biases not in
    float32 (or float64) are given to every layer holding them as float32 Parameters, the master
    copies that train.
    """
    prefix = base_prefix(model)
    groups: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        inside = within is None or path.startswith(within + ".")
        if inside and isinstance(module, (LowRankLinear, LowRankEmbedding)):
            group = groups.setdefault(id(module.B), [])
            if all(module is not other for _, other in group):
                group.append((path, module))
    found = []
    for group in groups.values():
        names = [n for path, _ in group if (n := _file_name(f"{path}.weight", file_names, prefix)) is not None]
        if not names:
            raise CheckpointError(f"the compressed model's layer '{group[0][0]}' has no factors in its file")
        layers = [module for _, module in group]
        biases: dict[str, torch.nn.Parameter] = {}
        for path, module in group:
            bias = getattr(module, "bias", None)
            name = _file_name(f"{path}.bias", file_names, prefix) if bias is not None else None
            if name is not None and all(bias is not other for other in biases.values()):
                biases[name] = bias
        found.append(TrainableFactors(names[0], layers, biases))
    if not found:
        raise UsageError("the compressed model has no factorized layer to heal; compress it first")
    for factors in found:
        _as_float32(factors)
    return found


def _as_float32(factors: TrainableFactors) -> None:
    """Each of the factors and biases in float32, the same Parameter in every layer holding it (ties stay tied)."""
    for attribute in ("B", "A"):
        current = getattr(factors.layers[0], attribute)
        if current.dtype not in (torch.float32, torch.float64):
            master = torch.nn.Parameter(current.detach().float(), requires_grad=current.requires_grad)
            for layer in factors.layers:
                setattr(layer, attribute, master)
    for name, bias in factors.biases.items():
        if bias.dtype not in (torch.float32, torch.float64):
            master = torch.nn.Parameter(bias.detach().float(), requires_grad=bias.requires_grad)
            for layer in factors.layers:
                if getattr(layer, "bias", None) is bias:
                    layer.bias = master
            factors.biases[name] = master


def _file_name(model_name: str, file_names: set[str], prefix: str) -> str | None:
    """The file's name of a model tensor (a factorized weight is in the file as NAME.B), if it holds one."""
    for name in prefix_variants(model_name, prefix):
        if name in file_names or f"{name}.B" in file_names:
            return name
    return None


def train(
    reference: torch.nn.Module,
    model: torch.nn.Module,
    layers: list[TrainableFactors],
    samples: TextSamples,
    options: HealOptions,
    *,
    pad: int,
    device: str,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[int, float]:
    """Train the layers' factors (and biases) so that model's outputs match reference's; (steps, final loss).

    AdamW on the float32 factors (`trainable` makes them so), the learning rate decaying linearly to 0,
    gradients clipped to options.max_grad_norm, the batches taken in an order drawn from a
    torch.Generator seeded by options.seed (the global RNG is left as it was). On a CUDA device the
    forward pass runs under bfloat16 autocast (where the GPU has bfloat16), the factors staying float32.
    """
    kind = model_kind(reference)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = [parameter for factors in layers for parameter in factors.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    generator = torch.Generator().manual_seed(options.seed)
    runs = batches(samples.ids, options.batch_size, device, pad)  # by length, so that padding stays short
    steps = options.steps or options.epochs * len(runs)
    targets = _Targets(reference, runs, kind)
    order: list[int] = []
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)  # linear decay to 0
    model.train(False)  # no dropout: the reference runs in eval mode too
    loss_value, average = float("nan"), None
    with torch.enable_grad():  # under a caller's no_grad there would be nothing to train
        for step in range(steps):
            if step % len(runs) == 0:  # each pass takes the batches in a new order
                order = torch.randperm(len(runs), generator=generator).tolist()
            index = order[step % len(runs)]
            ids, mask = runs[index]
            optimizer.zero_grad(set_to_none=True)  # the last step's gradients go before this step's activations come
            layered = kind == ENCODER  # every layer's hidden states: measured, a richer signal than the last alone
            target = targets(index)
            with training_autocast(device):
                output = model(input_ids=ids, attention_mask=mask, output_hidden_states=layered)
                loss = _loss(kind, target, output, mask)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                outputs = output.hidden_states if kind == ENCODER else [_logits(output)]
                raise TensorError(not_finite_message(loss_value, step, _finite(target), _finite(outputs), options.lr))
            del target, output  # LMs: the logits, batch × seq × vocab; the loss's graph keeps what backward needs
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
            optimizer.step()
            schedule.step()
            average = loss_value if average is None else 0.9 * average + 0.1 * loss_value
            if progress:
                progress(step + 1, steps, average)
    for parameter in parameters:
        parameter.requires_grad_(False)
        parameter.grad = None
    return steps, loss_value


def training_autocast(device: str):
    """bfloat16 autocast on a CUDA device that has bfloat16 (float32 master factors); none elsewhere."""
    where = torch.device(device)
    if where.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _logits(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.logits


def _finite(tensors) -> bool:
    """Whether every tensor of a model's outputs (hidden states, logits; an LM target's P and Σ P·log P) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def not_finite_message(loss: float, step: int, reference_finite: bool, compressed_finite: bool, lr: float) -> str:
    """Why the loss is NaN or infinite: the reference's outputs, the compressed model's before any update,
    or the updates (a learning rate too high)."""
    where = f"the healing loss is {loss} at step {step + 1}"
    if not reference_finite:
        return (
            f"{where}: the reference's outputs on the training text are NaN or infinite (NaN weights, or an"
            " overflow in its dtype), so there is nothing to heal toward; nothing was written; give a reference"
            " whose outputs are finite"
        )
    if step == 0 and not compressed_finite:
        return (
            f"{where}, before any update: the compressed model's outputs on the training text are NaN or infinite;"
            " nothing was written; compress the reference again (lowrank evaluate shows a model's outputs)"
        )
    if step == 0:
        return (
            f"{where}, before any update: the compressed model's outputs are too far from the reference's for the"
            " loss to hold in float32; nothing was written; compress at a higher rank"
        )
    return f"{where}; nothing was written; lower {arg('lr')} (now {lr:g})"


def _positions(kind: str, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bools: where the LMs' and classifiers' distributions are compared (causal: position t,
    predicting t + 1); (batch,) all true for a sequence classifier, whose logits are one row per sample."""
    if kind == SEQUENCE_CLASSIFIER:
        return torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    if kind != CAUSAL_LM:
        return mask.bool()
    where = torch.zeros_like(mask, dtype=torch.bool)
    where[:, :-1] = next_token_pairs(mask)
    return where


def _lm_target(kind: str, reference_output, mask: torch.Tensor):
    """What an LM's loss needs of the reference's output, taken before the candidate runs (under no_grad):
    (P, Σ P·log P), the next-token probabilities (positions, V) at the compared positions and their
    part of the KL, so that no vocabulary-wide tensor but P is kept."""
    logits = _logits(reference_output)
    log_p = torch.log_softmax(logits[_positions(kind, mask)].float(), dim=-1)  # (positions, V)
    p = log_p.exp()
    return p, (p * log_p).sum(dim=-1).sum(dtype=torch.float64)  # float64 over positions, not over (positions, V)


class _Targets:
    """The reference's outputs for each batch: an encoder's hidden states on the real tokens, or an LM's output.

    An encoder's are kept after the first pass, in bfloat16, batch by batch until they fill
    TARGET_CACHE_BYTES: later passes then skip the reference's forward pass for the kept batches and
    rerun it for the rest. The rounding (relative 2⁻⁸ per element) is far below the distance healing
    closes; a kept batch's rounded values serve every pass, the first too, so that all passes see the
    same targets. An LM's distributions (tokens × vocabulary) are too large to keep, so its reference
    runs every step (_lm_target).
    """

    def __init__(self, reference: torch.nn.Module, runs: list[tuple[torch.Tensor, torch.Tensor]], kind: str) -> None:
        self.reference, self.runs, self.kind = reference, runs, kind
        self.room = TARGET_CACHE_BYTES if kind == ENCODER else 0  # bytes left for kept targets
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.seen: set[int] = set()  # batches whose targets were computed once: kept, or rerun each pass

    @torch.no_grad()
    def __call__(self, index: int):
        if index in self.kept:
            return [h.float() for h in self.kept[index]]
        ids, mask = self.runs[index]
        output = self.reference(input_ids=ids, attention_mask=mask, output_hidden_states=self.kind == ENCODER)
        if self.kind != ENCODER:
            return _lm_target(self.kind, output, mask)
        real = mask.bool()
        hidden = [h[real] for h in output.hidden_states]  # (real tokens, d) per layer
        size = 2 * sum(h.numel() for h in hidden)  # in bfloat16
        first = index not in self.seen
        self.seen.add(index)
        if not first or size > self.room:  # a batch not kept on its first pass is never kept: same targets
            return [h.float() for h in hidden]
        self.room -= size
        self.kept[index] = [h.to(torch.bfloat16) for h in hidden]
        return [h.float() for h in self.kept[index]]


def _loss(kind: str, target, output, mask: torch.Tensor) -> torch.Tensor:
    if kind == ENCODER:  # the mean over layers of ‖h′ − h‖² / ‖h‖² on the real tokens
        real = mask.bool()
        terms = [
            (h2[real].float() - h).square().sum() / h.square().sum().clamp(min=1e-30)
            for h, h2 in zip(target, output.hidden_states, strict=True)
        ]
        return torch.stack(terms).mean()
    # the mean over positions of KL(P ‖ Q) = Σ P·log P − Σ P·log Q, the first sum taken with P: backward
    # keeps P and log Q (positions × V each), not the logits and P·(log P − log Q)'s temporaries too
    p, p_log_p = target
    logits = _logits(output)
    log_q = torch.log_softmax(logits[_positions(kind, mask)].float(), dim=-1)  # (positions, V)
    return (p_log_p - (p * log_q).sum(dim=-1).sum(dtype=torch.float64)) / len(log_q)


def healed_tensors(layers: list[TrainableFactors], dtype_of: Callable[[str], torch.dtype]) -> dict[str, torch.Tensor]:
    """The trained factors and biases under their names in the file, on the CPU in the file's dtypes.

    They come back to the CPU wherever they trained, so that they are measured against the
    reference's weights (read on the CPU) and written from there.
    """
    healed: dict[str, torch.Tensor] = {}
    for layer in layers:
        b, a = (factor.detach().to("cpu") for factor in layer.parameters()[:2])
        if layer.transposed:  # Conv1D: the file holds Wᵀ = Aᵀ·Bᵀ (nn.loading)
            b, a = a.t(), b.t()
        names = factor_names(layer.name)
        healed[names[0]], healed[names[1]] = b.contiguous(), a.contiguous()
        for name, bias in layer.biases.items():
            healed[name] = bias.detach().to("cpu")
    return {name: tensor.to(dtype_of(name)) for name, tensor in healed.items()}


def write_healed(
    compressed: Checkpoint,
    reference_weights: Callable[[str], torch.Tensor | None],
    healed: dict[str, torch.Tensor],
    weights: list[str],
    out: Path,
    *,
    folder: bool,
    force: bool,
    record: dict,
) -> Report:
    """The compressed checkpoint again, with the trained factors and biases, errors measured on what is written.

    healed: the trained tensors under their names in the file, in its dtypes (healed_tensors); weights:
    the factorized weights they heal, whose records get their rel_error measured anew. `out` and
    `folder` are prepare_output's, checked before the run began.
    """
    by_weight = set(weights)
    rows: list[TensorReport] = []
    with CheckpointOutput(compressed, out, folder=folder, force=force) as output:
        for shard, entries in compressed.by_shard():
            writer = output.writer_for(shard)
            original, records = decode_metadata(shard.path, shard.metadata)
            for entry in entries:
                if entry.name in healed:
                    writer.add_tensor(entry.name, healed[entry.name])
                else:
                    writer.add_bytes(entry.name, entry.dtype, entry.shape, compressed.read_bytes(entry.name))
            payload = json.loads(shard.metadata[METADATA_KEY])
            for name, fields in payload["tensors"].items():
                if name not in by_weight:
                    continue
                b, a = (healed[n] for n in factor_names(name))
                weight = reference_weights(name)
                if weight is None:
                    raise CheckpointError(
                        f"{compressed.source}: the reference has no tensor '{name}' to measure against"
                    )
                matrix = weight.reshape(weight.shape[0], -1).to(torch.float64)
                error = relative_error(matrix, b.to(torch.float64), a.to(torch.float64))
                before = fields["rel_error"]
                fields["rel_error"] = error
                fields.pop("output_error", None)  # of the old factors; healing changed them
                row = TensorReport(
                    name=name, shape=list(fields["shape"]), dtype=fields["dtype"], params=math.prod(fields["shape"]),
                    status=Status.healed, rank=fields["rank"], rel_error=error,
                    params_after=b.numel() + a.numel(), file=str(shard.path),
                    reason=f"rel. error before healing {before:.3g}",
                )  # fmt: skip
                rows.append(row)
            payload["heal"] = {**record, **_earlier_texts(payload.get("heal"))}
            writer.metadata = {**(original or {}), METADATA_KEY: json.dumps(payload, separators=(",", ":"))}
        size = output.commit()
        swept = list(output.notes)  # temporaries of killed runs removed beside OUT
    return Report(
        command="heal",
        sources=[str(compressed.source)],
        tensors=rows,
        totals=Totals.of(rows, compressed.nbytes, size),
        output=str(out),
        options={"heal": record, "notes": swept},
    )


def _earlier_texts(heal: object) -> dict:
    """The texts an earlier heal of the model trained on, which evaluate reads as not held out (made_with)."""
    if not isinstance(heal, dict):
        return {}
    earlier = heal.get("earlier_text_sha256")
    texts = [*(earlier if isinstance(earlier, list) else []), heal.get("text_sha256")]
    texts = [t for t in dict.fromkeys(texts) if isinstance(t, str)]
    return {"earlier_text_sha256": texts} if texts else {}


def torch_dtype_of(checkpoint: Checkpoint, name: str) -> torch.dtype:
    from lowrank_cli.io.dtypes import torch_dtype

    return torch_dtype(checkpoint.entries[name].dtype)


def heal(
    reference_dir: str | Path,
    compressed: str | Path,
    text: str | Path,
    out: str | Path,
    *,
    options: HealOptions,
    seq_len: int = SEQ_LEN,
    tokens: int = HEAL_TOKENS,
    samples: int | None = None,
    split=None,
    eval_text: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> Report:
    """Train COMPRESSED's factors toward REFERENCE on samples of `text` and write them to `out` (module docstring)."""
    from lowrank_cli.io.checkpoint import open_checkpoint
    from lowrank_cli.io.fileformat import find_lowrank
    from lowrank_cli.model.blockwise import measure_candidate
    from lowrank_cli.model.evaluate import held_out_note, metric
    from lowrank_cli.ops.samples import require_text

    folder, compressed = Path(reference_dir), Path(compressed)
    require_text(text)
    if eval_text is not None:
        require_text(eval_text, "eval_text")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; give the reference's Hugging Face model folder")
    if not compressed.exists():
        raise CheckpointError(f"{compressed}: no such file or folder; give the compressed model to heal")
    found_lowrank = find_lowrank(compressed, "give the compressed model to heal")
    if found_lowrank is None:
        raise CheckpointError(f"{compressed}: is not a lowrank file; heal trains the factors lowrank compress writes")
    sampling = {"seq_len": seq_len, "split": split}
    with open_checkpoint(compressed) as checkpoint, open_checkpoint(folder) as original:
        # OUT is checked before minutes of training: never the reference, the compressed model or a text
        out, as_folder = prepare_output(checkpoint, out, SUFFIX, force=force, inputs=[folder, text, eval_text])
        _check_pair(checkpoint, original)
        run = _train_blockwise if options.blockwise else _train_whole
        trained = run(
            folder, compressed, checkpoint, text, eval_text, options, sampling | {"tokens": tokens, "samples": samples},
            device=device, progress=progress,
        )  # fmt: skip
        found = trained.samples
        record = {
            "mode": "blockwise" if options.blockwise else "end-to-end",
            "text_sha256": found.text_sha256,
            "samples": len(found.ids),
            "tokens": found.tokens,
            "steps": trained.steps,
            "lr": options.lr,
            "batch_size": options.batch_size,
            "seed": options.seed,
            "max_grad_norm": options.max_grad_norm,
            "final_loss": trained.final_loss,
            "loss": trained.loss,
            **trained.extra,
        }
        report = write_healed(
            checkpoint, lambda name: original.read(name) if name in original.entries else None, trained.healed,
            trained.weights, out, folder=as_folder, force=force, record=record,
        )  # fmt: skip
        del trained  # the healed model is measured from what was written, not beside the trained one
    notes = list(found.notes)
    if eval_text is not None:  # as evaluate measures it: each model in its file's dtype, not the float32 that trains
        evaluator = _evaluator(folder, eval_text, options, sampling, device)
        before = measure_candidate(evaluator, folder, compressed)["fidelity"]
        after = measure_candidate(evaluator, folder, Path(report.output))["fidelity"]
        made = {**found_lowrank[1], "heal": record | _earlier_texts(found_lowrank[1].get("heal"))}  # as OUT says
        held_out, held_notes = held_out_note(made, evaluator.samples.text_sha256)
        notes += held_notes
        report.options["heal"] = {
            **record, "fidelity_before": before, "fidelity_after": after, "held_out": held_out,
            "metric": metric(evaluator.kind, evaluator.pooling),
        }  # fmt: skip
    report.options["notes"] = notes + report.options["notes"]
    return report


@dataclass
class _Trained:
    """What a mode of healing trained, for write_healed and the `heal` record."""

    samples: TextSamples
    healed: dict[str, torch.Tensor]  # the trained tensors under the file's names, in its dtypes
    weights: list[str]  # the factorized weights they heal
    steps: int
    final_loss: float
    loss: str  # what the loss measures, in words
    extra: dict  # more fields of the record


def _train_whole(
    folder: Path, compressed: Path, checkpoint: Checkpoint, text, eval_text, options: HealOptions, sampling: dict,
    *, device: str, progress,
) -> _Trained:  # fmt: skip
    """End to end: the compressed model's outputs toward the reference's, both models whole in memory."""
    from lowrank_cli.model.evaluate import load_candidate, model_samples

    reference, tokenizer = load_model(folder, device, "heal")  # in its own dtype, as evaluate runs it
    found = model_samples(reference, tokenizer, folder, text, **sampling)
    if eval_text is not None:  # its samples are read before minutes of training, so that a bad text fails first
        model_samples(reference, tokenizer, folder, eval_text, **_held(sampling))
    model = load_candidate(folder, compressed, type(reference), device, torch.float32)  # trained in float32
    layers = trainable(model, set(checkpoint.entries))
    pad = pad_id(tokenizer)
    steps, final = train(reference, model, layers, found, options, pad=pad, device=device, progress=progress)
    loss = {ENCODER: "relative MSE of every layer's hidden states", SEQUENCE_CLASSIFIER: "KL per sample"}.get(
        model_kind(reference), "KL per token"
    )
    healed = healed_tensors(layers, lambda name: torch_dtype_of(checkpoint, name))
    return _Trained(found, healed, [layer.name for layer in layers], steps, final, loss, {})


def _train_blockwise(
    folder: Path, compressed: Path, checkpoint: Checkpoint, text, eval_text, options: HealOptions, sampling: dict,
    *, device: str, progress,
) -> _Trained:  # fmt: skip
    """Block by block (model.heal_blocks): neither model is ever whole in memory."""
    from lowrank_cli.model.blockwise import load_tokenizer
    from lowrank_cli.model.evaluate import model_samples
    from lowrank_cli.model.heal_blocks import heal_blocks, open_runners

    reference, candidate = open_runners(folder, compressed, device)
    with reference, candidate:
        tokenizer = load_tokenizer(folder, "heal")
        found = model_samples(reference.model, tokenizer, folder, text, **sampling)
        if eval_text is not None:
            model_samples(reference.model, tokenizer, folder, eval_text, **_held(sampling))
        result = heal_blocks(
            reference, candidate, set(checkpoint.entries), lambda name: torch_dtype_of(checkpoint, name), found,
            options, pad=pad_id(tokenizer), progress=progress,
        )  # fmt: skip
    extra = {"block_inputs": options.block_inputs, "block_errors": [list(pair) for pair in result.block_errors]}
    loss = "relative MSE of each block's outputs, the mean over blocks"
    return _Trained(found, result.healed, result.weights, result.steps, result.final_loss, loss, extra)


def _held(sampling: dict) -> dict:
    """The evaluation text's sampling, as evaluate's: its own token count, the same lengths and split."""
    return {"seq_len": sampling["seq_len"], "split": sampling["split"], "flag": "eval_text"}


def _evaluator(folder: Path, eval_text, options: HealOptions, sampling: dict, device: str):
    """The evaluator of the fidelity before and after: block by block for a block-wise heal (neither model is
    whole in memory), else on the whole reference; both measure as evaluate does."""
    from lowrank_cli.model.blockwise import open_evaluator
    from lowrank_cli.model.evaluate import make_evaluator, model_samples

    if options.blockwise:
        evaluator, _ = open_evaluator(
            folder, eval_text, feature="heal", batch_size=options.batch_size, device=device, **_held(sampling)
        )
        return evaluator
    reference, tokenizer = load_model(folder, device, "heal")
    held = model_samples(reference, tokenizer, folder, eval_text, **_held(sampling))
    return make_evaluator(reference, tokenizer, held, folder, batch_size=options.batch_size, device=device)


def _check_pair(compressed: Checkpoint, original: Checkpoint) -> None:
    """COMPRESSED was made from REFERENCE: each of its tensors is one of the reference's, of the same shape."""
    records = factor_records(compressed)
    factors = {f for name in records for f in factor_names(name)}
    shapes = {name: tuple(record.shape) for name, record in records.items()}
    shapes.update({n: e.shape for n, e in compressed.entries.items() if n not in factors})
    for name, shape in shapes.items():
        entry = original.entries.get(name)
        if entry is None or tuple(entry.shape) != tuple(shape):
            what = "has no tensor" if entry is None else f"holds {list(entry.shape)}, not {list(shape)}, as"
            raise CheckpointError(
                f"{compressed.source}: was not compressed from {original.source}: the reference {what} '{name}';"
                " give the model it was compressed from"
            )
