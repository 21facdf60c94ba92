"""evaluate: what a compressed model lost, measured on the model's own outputs over real text.

Both models run on the same samples of a text (ops.samples), and the figures depend on the kind
of model (docs/evaluate.md):

    encoder     (no LM head; sentence-transformers folders): the cosine of each sample's pooled
                embedding (the folder's pooling config, else mean pooling over the attention mask)
                to the reference's; fidelity = the mean cosine
    causal-lm   the next-token distributions at every position: perplexity of both, mean
                KL(reference ‖ candidate) per token and top-1 agreement; fidelity = exp(−mean KL)
    masked-lm   the same at masked positions (MASK_SHARE of the tokens, drawn per sample from a fixed
                seed); the perplexity is of the true token there; fidelity = exp(−mean KL)
    sequence-classifier, token-classifier
                a task head's class distributions, per sample or per real token: mean KL and top-1
                agreement; fidelity = exp(−mean KL). Encoder-decoders and other heads are refused.

`Evaluator` holds the reference's outputs, so the candidates of a search (compress --fidelity)
each cost one run of the candidate only.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, UsageError, arg
from lowrank_cli.io.hfconfig import quiet_transformers
from lowrank_cli.ops.hfmodel import check_samples, pad_id
from lowrank_cli.ops.samples import TextSamples, batches, read_samples
from lowrank_cli.ops.settings import EVALUATE_BATCH_SIZE, EVALUATE_TOKENS, SEQ_LEN, Split

ENCODER, CAUSAL_LM, MASKED_LM = "encoder", "causal-lm", "masked-lm"
SEQUENCE_CLASSIFIER, TOKEN_CLASSIFIER = "sequence-classifier", "token-classifier"  # task heads: their class logits
CLASSIFIERS = (SEQUENCE_CLASSIFIER, TOKEN_CLASSIFIER)
MASK_SHARE = 0.15  # masked-lm: the share of (non-special) tokens masked, as BERT was trained
MASK_SEED = 0
CACHE_BYTES = 1 << 29  # LM log-probabilities of the reference kept in memory up to this size, else rerun


@dataclass
class Evaluation:
    """The figures of one candidate against its reference; `to_dict()` is the CLI's JSON."""

    reference: str
    candidate: str
    kind: str  # encoder, causal-lm, masked-lm, sequence-classifier or token-classifier
    metric: str  # what fidelity is, in words
    fidelity: float  # 1.0 = the reference's outputs
    samples: int
    tokens: int
    split: str
    text_sha256: str
    held_out: bool | None  # False: a text the candidate was made with (made_with; a note says which); None: not known
    pooling: str | None = None  # encoder
    cosine_mean: float | None = None  # encoder: cosine of pooled embeddings to the reference's
    cosine_p5: float | None = None
    cosine_min: float | None = None
    positions: int | None = None  # LMs: the positions compared (next or masked tokens); classifiers: samples, tokens
    perplexity_reference: float | None = None
    perplexity_candidate: float | None = None
    kl_mean: float | None = None  # mean over positions of KL(reference ‖ candidate), nats
    top1_agreement: float | None = None  # share of positions where both models' most likely token agree
    nonfinite: int = 0  # samples (LMs: positions) where the candidate's outputs are NaN or infinite
    notes: list[str] = field(default_factory=list)
    command: str = "evaluate"
    schema_version: int = 2

    def to_dict(self) -> dict:
        """The fields, a figure that is no finite number (NaN outputs, an infinite perplexity) as null."""
        return {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in asdict(self).items()
        }

    def gate(self, threshold: float) -> str | None:
        """Why the candidate fails `fidelity ≥ threshold` (evaluate --fail-below), or None when it passes.
        A fidelity that is no number fails: NaN compares below nothing, so it would pass any `<` test."""
        if self.fidelity >= threshold:
            return None
        if math.isnan(self.fidelity):
            unit = "samples" if self.kind == ENCODER else "positions"
            counted = self.samples if self.kind == ENCODER else self.positions
            return (
                f"the candidate's outputs are NaN or infinite on {self.nonfinite:,} of {counted:,} {unit}, so its"
                f" fidelity is not a number and does not reach {threshold:g}; check the candidate's weights"
            )
        return f"fidelity {self.fidelity:.4f} is below {threshold:g} ({self.metric})"


def model_kind(model: torch.nn.Module) -> str:
    """What evaluate compares, from the model's transformers class: an LM's next-token or masked-token
    distributions, a classifier head's class distributions, or a base model's (encoder's) embeddings.

    A model that needs more than input_ids (an encoder-decoder's decoder inputs) or whose head
    evaluate cannot compare (question answering, multiple choice, regression) is refused by name.
    """
    import inspect

    name = type(model).__name__
    config = getattr(model, "config", None)
    if "decoder_input_ids" in inspect.signature(model.forward).parameters:
        raise CheckpointError(
            f"{name} is an encoder-decoder, whose decoder needs inputs of its own; evaluate, heal and --fidelity"
            " compare encoders, causal and masked LMs and sequence or token classifiers"
        )
    kinds = {
        CAUSAL_LM: ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("ForCausalLM", "LMHeadModel")),
        MASKED_LM: ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("ForMaskedLM",)),
        SEQUENCE_CLASSIFIER: ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", ("ForSequenceClassification",)),
        TOKEN_CLASSIFIER: ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", ("ForTokenClassification",)),
        ENCODER: ("MODEL_MAPPING_NAMES", ("Model",)),
    }
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # an older or newer layout: the class names' own convention below
        modeling_auto = None
    kind = next((kind for kind, (mapping, _) in kinds.items() if name in _class_names(modeling_auto, mapping)), None)
    kind = kind or next((kind for kind, (_, endings) in kinds.items() if name.endswith(endings)), None)
    if kind is None:
        raise CheckpointError(
            f"{name}: evaluate, heal and --fidelity cannot compare this head's outputs; they compare encoders'"
            " embeddings, causal and masked LMs and sequence or token classifiers; give the base model's folder"
        )
    if kind in CLASSIFIERS:
        problem, labels = getattr(config, "problem_type", None), getattr(config, "num_labels", 2)
        if problem not in (None, "single_label_classification") or labels < 2:
            raise CheckpointError(
                f"{name}: a {problem or 'regression'} head, whose outputs are no distribution over classes;"
                " evaluate, heal and --fidelity compare single-label classifiers (or give the base model's folder)"
            )
    return kind


def _class_names(modeling_auto, mapping: str) -> set[str]:
    """The class names of one of transformers' auto mappings (a value may be a tuple of names)."""
    names: set[str] = set()
    for value in getattr(modeling_auto, mapping, {}).values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


# A sentence-transformers Pooling config names its mode by one of these keys set true (before 5.x), or
# by "pooling_mode" (its values, the second table); each maps to the mode `pool` computes.
POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = {
    "cls": "cls",
    "max": "max",
    "mean": "mean",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weightedmean",
    "lasttoken": "lasttoken",
}


def read_pooling(folder: Path) -> str:
    """A sentence-transformers folder's pooling mode (modules.json → its Pooling module's config), else mean.

    A mode the config names that `pool` does not compute (several modes concatenated, or one unknown)
    is refused: measured with another pooling, the figure would not be of the model's embeddings.
    """
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean"
    try:
        modules = json.loads(modules_file.read_text())
        pooling = next(m for m in modules if str(m.get("type", "")).endswith("Pooling"))
        config_file = folder / pooling.get("path", "") / "config.json"
        config = json.loads(config_file.read_text())
    except StopIteration:
        return "mean"
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{modules_file}: its pooling config cannot be read ({exc}); fix or remove it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: is not a pooling config (a JSON object); fix or remove it")
    if "pooling_mode" in config:
        named = config["pooling_mode"]
        named = named[0] if isinstance(named, list) and len(named) == 1 else named
        modes = [POOLING_MODES.get(named) if isinstance(named, str) else None]
        described = json.dumps(named)
    else:
        set_keys = [key for key in config if key.startswith("pooling_mode_") and config[key] is True]
        modes = [POOLING_KEYS.get(key) for key in set_keys] or ["mean"]  # none set: sentence-transformers' mean
        described = ", ".join(set_keys)
    if len(modes) != 1 or modes[0] is None:
        known = ", ".join(POOLING_MODES)
        raise CheckpointError(
            f"{config_file}: pools by {described}, which evaluate cannot compute (one of {known});"
            " measure the transformer's own folder, or give the folder one of those modes"
        )
    return modes[0]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(batch, seq, d) hidden states -> (batch, d) sentence embeddings, padding left out.

    Samples are padded on the right (ops.samples.batches), so a sample's real tokens are its first
    mask.sum() positions; weightedmean weighs the i-th real token by i (from 1), as sentence-transformers.
    """
    hidden = hidden.to(torch.float64)
    weights = mask.to(hidden.dtype)[..., None]  # (batch, seq, 1)
    lengths = weights.sum(dim=1).clamp(min=1)  # (batch, 1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1).clamp(min=1) - 1  # right padding: the last real token
        return hidden[torch.arange(hidden.shape[0]), last]
    if mode == "max":
        return hidden.masked_fill(weights == 0, -torch.inf).max(dim=1).values
    if mode == "weightedmean":
        position = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device)  # (seq,)
        weighted = weights * position[None, :, None]  # (batch, seq, 1)
        return (hidden * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1)
    total = (hidden * weights).sum(dim=1)
    return total / lengths.sqrt() if mode == "mean_sqrt_len" else total / lengths


def eval_batches(
    samples: TextSamples,
    kind: str,
    pad: int,
    mask_token: int | None,
    special: set[int] | None,
    batch_size: int,
    device: str,
) -> list[tuple]:
    """The batches both models run on: (ids, attention mask), and for a masked LM (masked ids, mask, where
    masked, the original ids)."""
    if kind == MASKED_LM and mask_token is None:
        raise CheckpointError("the tokenizer has no mask token, which a masked LM's evaluation needs")
    found = batches(samples.ids, batch_size, device, pad)
    if kind == MASKED_LM:  # each sample's masked positions are its own, whatever batch it falls in
        chosen = [_mask_positions(ids, index, special or set()) for index, ids in enumerate(samples.ids)]
        where = batches(chosen, batch_size, device, 0)  # the same batches: of the same lengths, in the same order
        found = [
            (ids.masked_fill(picked.bool(), mask_token), mask, picked.bool(), ids)
            for (ids, mask), (picked, _) in zip(found, where, strict=True)
        ]
    return found


class Evaluator:
    """The reference model's outputs on fixed samples, and the figures of any candidate against them."""

    def __init__(
        self,
        reference: torch.nn.Module,
        samples: TextSamples,
        *,
        kind: str,
        pad: int,
        mask_token: int | None = None,
        special: set[int] | None = None,
        pooling: str = "mean",
        batch_size: int = EVALUATE_BATCH_SIZE,
        device: str = "cpu",
    ) -> None:
        self.reference, self.samples, self.kind, self.pooling = reference, samples, kind, pooling
        self.batches = eval_batches(samples, kind, pad, mask_token, special, batch_size, device)
        self._cache: list | None = None
        self._cache = [self._reference_output(i) for i in range(len(self.batches))] if self._cacheable() else None

    def _cacheable(self) -> bool:
        if self.kind == ENCODER:
            return True
        config = getattr(self.reference, "config", None)
        width = getattr(config, "num_labels" if self.kind in CLASSIFIERS else "vocab_size", 0) or 0
        return self.samples.tokens * width * 4 <= CACHE_BYTES

    @torch.no_grad()
    def _run(self, model: torch.nn.Module, index: int) -> torch.Tensor:
        ids, mask = self.batches[index][:2]
        output = model(input_ids=ids, attention_mask=mask)
        if self.kind == ENCODER:
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            return pool(hidden, mask, self.pooling)
        logits = output[0] if isinstance(output, tuple) else output.logits
        return torch.log_softmax(logits.to(torch.float32), dim=-1)

    def _reference_output(self, index: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[index]
        return self._run(self.reference, index)

    def measure(self, candidate: torch.nn.Module) -> dict[str, float]:
        """The figures of `candidate` (same tokenizer and kind as the reference), by kind."""
        cosines: list[torch.Tensor] = []
        kl = agree = nll_ref = nll_cand = 0.0
        positions = nonfinite = 0
        for index, batch in enumerate(self.batches):
            ids, mask = batch[:2]
            reference, output = self._reference_output(index), self._run(candidate, index)
            if self.kind == ENCODER:
                require_finite(reference)
                nonfinite += int((~torch.isfinite(output)).any(dim=-1).sum())
                cosines.append(torch.nn.functional.cosine_similarity(output, reference, dim=-1, eps=1e-30))
                continue
            targets = None  # the true tokens, where there are: an LM's perplexity
            if self.kind == CAUSAL_LM:  # position t predicts token t + 1
                where = next_token_pairs(mask)
                targets = ids[:, 1:][where]
                p, q = reference[:, :-1][where], output[:, :-1][where]  # (positions, V) log-probabilities
            elif self.kind == MASKED_LM:
                where, targets = batch[2], batch[3][batch[2]]
                p, q = reference[where], output[where]
            elif self.kind == TOKEN_CLASSIFIER:  # every real token's classes
                p, q = reference[mask.bool()], output[mask.bool()]  # (tokens, labels)
            else:  # a sequence classifier: each sample's classes, (batch, labels)
                p, q = reference, output
            require_finite(p)
            nonfinite += int((~torch.isfinite(q)).any(dim=-1).sum())
            kl += float((p.exp() * (p - q)).sum(dtype=torch.float64))
            agree += float((p.argmax(dim=-1) == q.argmax(dim=-1)).sum())
            if targets is not None:
                nll_ref -= float(p.gather(1, targets[:, None]).sum(dtype=torch.float64))
                nll_cand -= float(q.gather(1, targets[:, None]).sum(dtype=torch.float64))
            positions += len(p)
        if self.kind == ENCODER:
            values = torch.cat(cosines).to(torch.float64)
            mean = float(values.mean())
            return {
                "fidelity": mean,
                "cosine_mean": mean,
                "cosine_p5": float(torch.quantile(values, 0.05)),
                "cosine_min": float(values.min()),
                "nonfinite": nonfinite,
            }
        if positions == 0:
            raise UsageError(f"the samples leave no position to compare; give longer text or raise {arg('seq_len')}")
        mean_kl = max(kl / positions, 0.0)
        figures = {"fidelity": math.exp(-mean_kl), "positions": positions, "kl_mean": mean_kl}
        figures["top1_agreement"] = agree / positions
        figures["nonfinite"] = nonfinite
        if self.kind not in CLASSIFIERS:
            figures["perplexity_reference"] = exp_or_inf(nll_ref / positions)
            figures["perplexity_candidate"] = exp_or_inf(nll_cand / positions)
        return figures


def next_token_pairs(mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq − 1) bools: where tokens t and t + 1 are both real, so a causal LM's prediction at t is compared."""
    return (mask[:, :-1] * mask[:, 1:]).bool()


def exp_or_inf(value: float) -> float:
    """e**value, inf where a float overflows (a perplexity of a candidate far off), nan for nan."""
    return math.exp(value) if value < 709 or math.isnan(value) else math.inf


def require_finite(reference: torch.Tensor) -> None:
    """Refuses a reference whose outputs (log-probabilities or embeddings) are not all finite."""
    if not bool(torch.isfinite(reference).all()):
        raise CheckpointError(
            "the reference's outputs on the text are NaN or infinite (NaN weights, or an overflow in its dtype),"
            " so there is nothing to compare with; give a reference whose outputs are finite"
        )


def metric(kind: str, pooling: str | None) -> str:
    if kind == ENCODER:
        return f"mean cosine of the candidate's sentence embeddings to the reference's ({pooling} pooling)"
    if kind == SEQUENCE_CLASSIFIER:
        return "exp(-mean KL(reference || candidate)) of the class distributions, per sample"
    where = {
        CAUSAL_LM: "next-token distributions",
        MASKED_LM: f"distributions at masked positions ({MASK_SHARE:.0%})",
        TOKEN_CLASSIFIER: "class distributions of every real token",
    }[kind]
    return f"exp(-mean KL(reference || candidate)) of the {where}, per token"


def _mask_positions(ids: list[int], index: int, special: set[int]) -> list[int]:
    """1 where sample `index` is masked: MASK_SHARE of its non-special tokens, at least one when it has one.

    The draw is the sample's own (a generator seeded by MASK_SEED and its index), so the positions
    do not depend on the batch size or on which samples share its batch.
    """
    generator = torch.Generator().manual_seed(MASK_SEED + index)
    draws = torch.rand(len(ids), generator=generator).tolist()
    eligible = [token not in special for token in ids]
    chosen = [int(draw < MASK_SHARE and ok) for draw, ok in zip(draws, eligible, strict=True)]
    if not any(chosen) and any(eligible):
        chosen[eligible.index(True)] = 1
    return chosen


def evaluate(
    reference_dir: str | Path,
    candidate: str | Path,
    text: str | Path,
    *,
    seq_len: int = SEQ_LEN,
    tokens: int = EVALUATE_TOKENS,
    samples: int | None = None,
    split=None,
    batch_size: int = EVALUATE_BATCH_SIZE,
    device: str = "cpu",
) -> Evaluation:
    """Run the reference folder and the candidate over samples of `text` and compare their outputs.

    Causal and masked LMs and encoders run block by block (model.blockwise), in the memory of one
    block; other models (task heads) are loaded whole.

    candidate: a folder with config.json (lowrank-compressed or dense), or a weights file (or folder of
    shards) of the reference's architecture; either way loaded by nn.loading.load_pretrained, factors
    running as factors, never expanded.
    """
    from lowrank_cli.io.fileformat import find_lowrank
    from lowrank_cli.ops.samples import require_text

    folder, candidate = Path(reference_dir), Path(candidate)
    require_text(text)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; give the reference's Hugging Face model folder")
    if not candidate.exists():
        raise CheckpointError(f"{candidate}: no such file or folder; give the compressed model to evaluate")
    found_lowrank = find_lowrank(candidate, CANDIDATE_FIX)  # before the reference loads: a FIFO is refused at once
    payload = found_lowrank[1] if found_lowrank else None
    from lowrank_cli.model.blockwise import measure_candidate, open_evaluator

    evaluator, found = open_evaluator(
        folder, text, feature="evaluate", batch_size=batch_size, device=device, seq_len=seq_len, tokens=tokens,
        samples=samples, split=split,
    )  # fmt: skip
    figures = measure_candidate(evaluator, folder, candidate)
    held_out, notes = held_out_note(payload, found.text_sha256)
    if figures["nonfinite"]:
        unit = "samples" if evaluator.kind == ENCODER else "positions"
        notes.append(
            f"the candidate's outputs are NaN or infinite on {figures['nonfinite']:,} {unit}, so fidelity and the"
            " figures of those outputs are not numbers (null in the JSON)"
        )
    return Evaluation(
        reference=str(folder),
        candidate=str(candidate),
        kind=evaluator.kind,
        metric=metric(evaluator.kind, evaluator.pooling if evaluator.kind == ENCODER else None),
        samples=len(found.ids),
        tokens=found.tokens,
        split=found.split.value,
        text_sha256=found.text_sha256,
        held_out=held_out,
        pooling=evaluator.pooling if evaluator.kind == ENCODER else None,
        notes=found.notes + notes,
        **figures,
    )


def model_samples(
    reference: torch.nn.Module,
    tokenizer,
    folder: Path,
    text: str | Path,
    *,
    seq_len: int = SEQ_LEN,
    tokens: int = EVALUATE_TOKENS,
    samples: int | None = None,
    split: Split | None = None,
    flag: str = "text",
) -> TextSamples:
    """Samples of `text` (ops.samples.read_samples) that the reference can read (calibrate's checks);
    `flag` is the argument that gave it (text, eval_text), as its errors name it."""
    found = read_samples(
        tokenizer, text, seq_len=seq_len, tokens=tokens, samples=samples, split=split or Split.auto, flag=flag
    )
    check_samples(reference, tokenizer, found.ids, folder)
    return found


def make_evaluator(
    reference: torch.nn.Module, tokenizer, found: TextSamples, folder: Path, *, batch_size: int, device: str
) -> Evaluator:
    """The Evaluator of a reference model loaded from `folder`, its kind and pooling read off the model and folder."""
    kind = model_kind(reference)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return Evaluator(
        reference,
        found,
        kind=kind,
        pad=pad_id(tokenizer),
        mask_token=getattr(tokenizer, "mask_token_id", None),
        special=special,
        pooling=read_pooling(folder) if kind == ENCODER else "mean",
        batch_size=batch_size,
        device=device,
    )


def load_candidate(
    folder: Path, candidate: Path, model_class: type, device: str, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The candidate as a model of the reference's class: a lowrank file or folder through load_pretrained
    (its own folder's config, else the reference's), a dense folder through transformers."""
    from lowrank_cli.io.paths import require_files_in
    from lowrank_cli.nn.loading import build_and_load

    if candidate.is_dir():  # transformers or load_pretrained reads the folder's files: none may block open()
        require_files_in(candidate, CANDIDATE_FIX)
    own_config = candidate.is_dir() and (candidate / "config.json").is_file()
    if is_lowrank(candidate):
        config, weights = (candidate, None) if own_config else (folder, candidate)
        model, _ = build_and_load(config, model_class, weights=weights, dtype=dtype, strict=True, fix=MISFIT_FIX)
    elif own_config:
        try:
            with quiet_transformers():  # its load report and bar; what is missing is said below, in one line
                model, info = model_class.from_pretrained(
                    candidate, dtype="auto", local_files_only=True, trust_remote_code=False, output_loading_info=True
                )
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(
                f"{candidate}: cannot be loaded as {model_class.__name__} ({exc})".splitlines()[0]
            ) from None
        missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
        if missing:  # transformers would run them randomly initialised: not a measurement of anything
            raise CheckpointError(
                f"{candidate}: has no tensor '{missing[0]}' of {model_class.__name__} ({len(missing)} missing or of"
                " another shape); give the reference's own compressed or fine-tuned model"
            )
    else:
        raise CheckpointError(
            f"{candidate}: is neither a lowrank file nor a model folder with config.json; give a compressed"
            " model (lowrank compress) or a Hugging Face folder"
        )
    return model.to(device).eval()


CANDIDATE_FIX = "give the compressed model (lowrank compress) or a Hugging Face folder"
MISFIT_FIX = "give a model compressed from the reference (lowrank compress REFERENCE)"


def is_lowrank(path: Path, fix: str = CANDIDATE_FIX) -> bool:
    """Whether a file, or any safetensors file of a folder, was written by lowrank compress (what is
    not a regular file is refused first, ending in `fix`: io.fileformat.find_lowrank)."""
    from lowrank_cli.io.fileformat import find_lowrank

    return find_lowrank(path, fix) is not None


def made_with(payload: dict | None) -> dict[str, str]:
    """The texts a lowrank file's metadata says made it: text hash -> what it was, in words.

    Its calibration statistics' text, the text `compress --fidelity` chose its budget on, and the
    texts heal trained it on (the last heal's, and those of any heal before it).
    """
    payload = payload if isinstance(payload, dict) else {}
    uses: dict[str, str] = {}

    def add(record: object, key: str, what: str) -> None:
        value = record.get(key) if isinstance(record, dict) else None
        for digest in value if isinstance(value, list) else [value]:
            if isinstance(digest, str) and digest:
                uses.setdefault(digest, what)

    add(payload.get("calibration"), "text_sha256", "candidate's calibration text")
    add(payload.get("fidelity"), "text_sha256", "text compress --fidelity chose the candidate's budget on")
    add(payload.get("heal"), "text_sha256", "text heal trained the candidate on")
    add(payload.get("heal"), "earlier_text_sha256", "text heal trained the candidate on")
    return uses


def held_out_note(payload: dict | None, text_sha256: str) -> tuple[bool | None, list[str]]:
    """Whether the text is held out from the candidate's making (`payload`: its lowrank metadata,
    None for a dense model, whose texts are not recorded): not when it is a text made_with lists."""
    if not payload:
        return None, []
    what = made_with(payload).get(text_sha256)
    if what is not None:
        return False, [
            f"the evaluation text is the {what}, so this figure is not held out;"
            " evaluate on another text for what the model keeps on unseen inputs"
        ]
    return True, []
