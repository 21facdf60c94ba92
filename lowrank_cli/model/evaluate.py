"""evaluate: what a compressed model lost, measured on the model's own outputs over real text.

Both models run on the same samples of a text (ops.samples), and the figures depend on the kind
of model (docs/evaluate.md):

    encoder     (no LM head; sentence-transformers folders): the cosine of each sample's pooled
                embedding (the folder's pooling config, else mean pooling over the attention mask)
                to the reference's; fidelity = the mean cosine
    causal-lm   the next-token distributions at every position: perplexity of both, mean
                KL(reference ‖ candidate) per token and top-1 agreement; fidelity = exp(−mean KL)
    masked-lm   the same at masked positions (MASK_SHARE of the tokens, chosen by a fixed seed);
                the perplexity is of the true token there; fidelity = exp(−mean KL)

`Evaluator` holds the reference's outputs, so the candidates of a search (compress --fidelity)
each cost one run of the candidate only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, UsageError, arg
from lowrank_cli.ops.hfmodel import check_samples
from lowrank_cli.ops.samples import TextSamples, batches, read_samples
from lowrank_cli.ops.settings import EVALUATE_BATCH_SIZE, EVALUATE_TOKENS, SEQ_LEN, Split

ENCODER, CAUSAL_LM, MASKED_LM = "encoder", "causal-lm", "masked-lm"
MASK_SHARE = 0.15  # masked-lm: the share of (non-special) tokens masked, as BERT was trained
MASK_SEED = 0
CACHE_BYTES = 1 << 29  # LM log-probabilities of the reference kept in memory up to this size, else rerun


@dataclass
class Evaluation:
    """The figures of one candidate against its reference; `to_dict()` is the CLI's JSON."""

    reference: str
    candidate: str
    kind: str  # encoder, causal-lm or masked-lm
    metric: str  # what fidelity is, in words
    fidelity: float  # 1.0 = the reference's outputs
    samples: int
    tokens: int
    split: str
    text_sha256: str
    held_out: bool | None  # False: the text is the candidate's calibration text; None: not known
    pooling: str | None = None  # encoder
    cosine_mean: float | None = None  # encoder: cosine of pooled embeddings to the reference's
    cosine_p5: float | None = None
    cosine_min: float | None = None
    positions: int | None = None  # LMs: the positions compared (next tokens, or masked tokens)
    perplexity_reference: float | None = None
    perplexity_candidate: float | None = None
    kl_mean: float | None = None  # mean over positions of KL(reference ‖ candidate), nats
    top1_agreement: float | None = None  # share of positions where both models' most likely token agree
    notes: list[str] = field(default_factory=list)
    command: str = "evaluate"
    schema_version: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def model_kind(model: torch.nn.Module) -> str:
    """causal-lm, masked-lm or encoder, from the model's transformers class."""
    name = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto

        if name in set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            return CAUSAL_LM
        if name in set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
            return MASKED_LM
    except ImportError:  # an older or newer layout: the class names' own convention
        pass
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    if name.endswith("ForMaskedLM"):
        return MASKED_LM
    return ENCODER


def read_pooling(folder: Path) -> str:
    """A sentence-transformers folder's pooling mode (modules.json → its Pooling module's config), else mean."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean"
    try:
        modules = json.loads(modules_file.read_text())
        pooling = next(m for m in modules if str(m.get("type", "")).endswith("Pooling"))
        config = json.loads((folder / pooling.get("path", "") / "config.json").read_text())
    except StopIteration:
        return "mean"
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{modules_file}: its pooling config cannot be read ({exc}); fix or remove it") from None
    for mode in ("cls", "max", "mean_sqrt_len", "lasttoken", "mean"):
        key = (
            "pooling_mode_mean_tokens"
            if mode == "mean"
            else f"pooling_mode_{mode}_token" + ("s" if mode in ("max", "mean_sqrt_len") else "")
        )
        if config.get(key):
            return mode
    return "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(batch, seq, d) hidden states -> (batch, d) sentence embeddings, padding left out."""
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
    if kind == MASKED_LM:
        found = [_masked(ids, mask, mask_token, special or set()) for ids, mask in found]
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
        vocabulary = getattr(getattr(self.reference, "config", None), "vocab_size", 0) or 0
        return self.samples.tokens * vocabulary * 4 <= CACHE_BYTES

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

    def measure(self, candidate: torch.nn.Module, progress: Callable[[], None] | None = None) -> dict[str, float]:
        """The figures of `candidate` (same tokenizer and kind as the reference), by kind."""
        cosines: list[torch.Tensor] = []
        kl = agree = nll_ref = nll_cand = 0.0
        positions = 0
        for index, batch in enumerate(self.batches):
            ids, mask = batch[:2]
            reference, output = self._reference_output(index), self._run(candidate, index)
            if progress:
                progress()
            if self.kind == ENCODER:
                cosines.append(torch.nn.functional.cosine_similarity(output, reference, dim=-1, eps=1e-30))
                continue
            if self.kind == CAUSAL_LM:  # position t predicts token t + 1
                where = (mask[:, :-1] * mask[:, 1:]).bool()
                targets = ids[:, 1:][where]
                p, q = reference[:, :-1][where], output[:, :-1][where]  # (positions, V) log-probabilities
            else:
                where, targets = batch[2], batch[3][batch[2]]
                p, q = reference[where], output[where]
            kl += float((p.exp() * (p - q)).sum(dtype=torch.float64))
            agree += float((p.argmax(dim=-1) == q.argmax(dim=-1)).sum())
            nll_ref -= float(p.gather(1, targets[:, None]).sum(dtype=torch.float64))
            nll_cand -= float(q.gather(1, targets[:, None]).sum(dtype=torch.float64))
            positions += int(targets.numel())
        if self.kind == ENCODER:
            values = torch.cat(cosines).to(torch.float64)
            mean = float(values.mean())
            return {
                "fidelity": mean,
                "cosine_mean": mean,
                "cosine_p5": float(torch.quantile(values, 0.05)),
                "cosine_min": float(values.min()),
            }
        if positions == 0:
            raise UsageError(f"the samples leave no position to compare; give longer text or raise {arg('seq_len')}")
        mean_kl = max(kl / positions, 0.0)
        return {
            "fidelity": math.exp(-mean_kl),
            "positions": positions,
            "perplexity_reference": math.exp(nll_ref / positions),
            "perplexity_candidate": math.exp(nll_cand / positions),
            "kl_mean": mean_kl,
            "top1_agreement": agree / positions,
        }


def metric(kind: str, pooling: str | None) -> str:
    if kind == ENCODER:
        return f"mean cosine of the candidate's sentence embeddings to the reference's ({pooling} pooling)"
    where = "next-token distributions" if kind == CAUSAL_LM else f"distributions at masked positions ({MASK_SHARE:.0%})"
    return f"exp(-mean KL(reference || candidate)) of the {where}, per token"


def _masked(
    ids: torch.Tensor, mask: torch.Tensor, mask_token: int, special: set[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked ids, attention mask, where masked, the original ids): MASK_SHARE of the real, non-special
    tokens replaced by the mask token, the same ones every run (a generator seeded by the batch)."""
    generator = torch.Generator().manual_seed(MASK_SEED + int(ids.numel()))
    eligible = mask.bool().cpu() & ~torch.isin(ids.cpu(), torch.tensor(sorted(special), dtype=ids.dtype))
    chosen = (torch.rand(ids.shape, generator=generator) < MASK_SHARE) & eligible
    for row in range(ids.shape[0]):  # at least one masked token per sample that has one to mask
        if not chosen[row].any() and eligible[row].any():
            chosen[row, int(eligible[row].nonzero()[0])] = True
    chosen = chosen.to(ids.device)
    return ids.masked_fill(chosen, mask_token), mask, chosen, ids


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
    from lowrank_cli.ops.samples import require_text

    folder, candidate = Path(reference_dir), Path(candidate)
    require_text(text)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; give the reference's Hugging Face model folder")
    if not candidate.exists():
        raise CheckpointError(f"{candidate}: no such file or folder; give the compressed model to evaluate")
    from lowrank_cli.model.blockwise import measure_candidate, open_evaluator

    evaluator, found = open_evaluator(
        folder, text, feature="evaluate", batch_size=batch_size, device=device, seq_len=seq_len, tokens=tokens,
        samples=samples, split=split,
    )  # fmt: skip
    figures = measure_candidate(evaluator, folder, candidate)
    held_out, notes = held_out_note(candidate, found.text_sha256)
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
) -> TextSamples:
    """Samples of `text` (ops.samples.read_samples) that the reference can read (calibrate's checks)."""
    found = read_samples(tokenizer, text, seq_len=seq_len, tokens=tokens, samples=samples, split=split or Split.auto)
    check_samples(reference, tokenizer, found.ids, folder)
    return found


def make_evaluator(
    reference: torch.nn.Module, tokenizer, found: TextSamples, folder: Path, *, batch_size: int, device: str
) -> Evaluator:
    """The Evaluator of a reference model loaded from `folder`, its kind and pooling read off the model and folder."""
    kind = model_kind(reference)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return Evaluator(
        reference,
        found,
        kind=kind,
        pad=pad,
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
    from lowrank_cli.nn.loading import load_pretrained

    own_config = candidate.is_dir() and (candidate / "config.json").is_file()
    if is_lowrank(candidate):
        if own_config:
            model = load_pretrained(candidate, model_class, dtype=dtype)
        else:
            model = load_pretrained(folder, model_class, weights=candidate, dtype=dtype)
    elif own_config:
        try:
            with _quiet_transformers():  # its load report and bar; what is missing is said below, in one line
                model, info = model_class.from_pretrained(
                    candidate, local_files_only=True, trust_remote_code=False, output_loading_info=True
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


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def is_lowrank(path: Path) -> bool:
    """Whether a file, or any safetensors file of a folder, was written by lowrank compress."""
    from safetensors import SafetensorError, safe_open

    from lowrank_cli.io.fileformat import METADATA_KEY

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                if METADATA_KEY in (handle.metadata() or {}):
                    return True
        except (OSError, SafetensorError):
            continue
    return False


def held_out_note(candidate: Path, text_sha256: str) -> tuple[bool | None, list[str]]:
    """Whether the text is held out from the candidate's making: not when it is its calibration text."""
    from safetensors import safe_open

    from lowrank_cli.io.fileformat import METADATA_KEY

    files = sorted(candidate.glob("*.safetensors")) if candidate.is_dir() else [candidate]
    try:
        with safe_open(str(files[0]), framework="pt") as handle:
            metadata = handle.metadata() or {}
        record = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    except (IndexError, OSError, ValueError, KeyError):
        return None, []
    if not isinstance(record, dict):
        return None, []  # a dense checkpoint: what text it was made with is not recorded
    calibration = record.get("calibration") or {}
    if calibration.get("text_sha256") == text_sha256:
        return False, [
            "the evaluation text is the calibration text, so this figure is not held out;"
            " evaluate on another text for what the model keeps on unseen inputs"
        ]
    return True, []
