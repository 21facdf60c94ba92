"""Running a lowrank file as a model: factors become LowRankLinear / LowRankEmbedding layers.

apply_factors works on any torch model; load_pretrained builds a transformers model on the meta
device first, so no dense weight is ever allocated; save_factors writes a factored model back
in the lowrank format, which `lowrank expand` reads.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from lowrank_cli.errors import CheckpointError, MissingExtraError, OutputError, UsageError, arg, require_extra
from lowrank_cli.io.checkpoint import Checkpoint, open_checkpoint
from lowrank_cli.io.dtypes import CODE_OF, torch_dtype
from lowrank_cli.io.fileformat import METADATA_KEY, FactorRecord, encode_metadata, factor_names, factor_records
from lowrank_cli.io.hfconfig import base_prefix, config_errors, is_conv1d, prefix_variants, require_transformers
from lowrank_cli.io.outputs import README, FolderOutput, keep_the_rest, lowrank_name, write_readme
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.nn.linear import LowRankEmbedding, LowRankLinear, lay_out_factors
from lowrank_cli.nn.siblings import fuse_siblings

WEIGHTS_NAME = lowrank_name("model.safetensors")  # what from_pretrained does not look for


@dataclass
class _MatchedFactors:
    """One factorized weight of the file and the model tensor it replaces: its name in each, its record, B and A."""

    name: str  # in the file
    target: str  # in the model
    record: FactorRecord
    b: torch.Tensor  # (m, r)
    a: torch.Tensor  # (r, n)


class LoadResult(NamedTuple):
    """What a load did not match, as torch's `load_state_dict` reports it.

    missing_keys: the model's parameters and persistent buffers (its state_dict names, a tied
        tensor under each of its names) that the file holds nothing for.
    unexpected_keys: the file's tensors that match nothing in the model; a factorized weight is
        named as the weight it replaces (NAME, not NAME.B and NAME.A).
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


def apply_factors(
    model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None, strict: bool = True
) -> LoadResult:
    """Load a lowrank file (or folder of shards) into `model`, running every factorized weight as factors.

    Each module whose weight the file holds as NAME.B / NAME.A is replaced by a LowRankLinear (for
    nn.Linear and GPT-2 Conv1D) or a LowRankEmbedding (for nn.Embedding); modules tied to it (an
    lm_head sharing the embedding's weight) are replaced too and share the factors. Every other
    tensor of the file is loaded as it is.

    Names are matched exactly, or with the model's `base_model_prefix` added or removed (a file saved
    from BertModel loads into BertForSequenceClassification with strict=False: its new head is missing).
    A SentenceTransformer takes the file into its transformers model (a compressed folder's weights
    name that model's tensors). Nothing is changed unless every shape fits and, with strict, every name.

    Args:
        model: any torch model, or a SentenceTransformer; its parameters may be on the meta device.
        path: a lowrank .safetensors file, a folder of lowrank shards, or their index.
        dtype: the floating-point dtype to load tensors in. By default each tensor takes the dtype
            of the model's tensor it replaces, or the file's own for tensors on the meta device.
            Tensors that keep the file's dtype on the CPU map the file instead of copying it (see
            load_pretrained); any other is read and converted.
        strict: as for torch's load_state_dict: the file's names and the model's must match both
            ways, else a CheckpointError names what does not and nothing changes. strict=False loads
            what matches; the model's tensors that the file lacks keep their values.

    Returns:
        A LoadResult: missing_keys (the model's, not in the file) and unexpected_keys (the file's,
        not in the model), both empty under strict. The model is changed in place.

    Example:
        >>> model = BertForSequenceClassification(config)
        >>> apply_factors(model, "bert.lowrank/model.lowrank.safetensors", strict=False)
        LoadResult(missing_keys=['classifier.weight', 'classifier.bias'], unexpected_keys=[])
    """
    model = _transformers_model(model)
    factored = [name for name, module in model.named_modules() if isinstance(module, (LowRankLinear, LowRankEmbedding))]
    if factored:  # its weights are factors already: a file's names would fit none of them
        raise UsageError(
            f"the model is already factored ({len(factored)} low-rank layers, first '{factored[0] or 'the model'}');"
            " apply_factors replaces dense layers: give it a model with dense weights, such as one built anew"
            " from its config"
        )
    fix = "load it into the model it was saved from, or pass strict=False to load what matches"
    with open_checkpoint(path) as checkpoint:
        plan = _plan(model, checkpoint, dtype, strict=strict, fix=fix)
    _replace_modules(model, plan.factored)
    _load_dense(model, plan.dense)
    return plan.result


def load_pretrained(
    folder: str | Path,
    auto_class: type | None = None,
    *,
    weights: str | Path | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    output_loading_info: bool = False,
    fuse: bool = True,
) -> nn.Module:
    """A transformers model from a folder with config.json and lowrank safetensors, ready for eval().

    The model is built on the meta device from config.json, then given the file's factors and
    tensors, never the dense weights. Tensors kept in the file's dtype on the CPU stay backed by a
    copy-on-write mapping of the file, so pages that no forward touches (a word-embedding table's
    unused rows) are never read; the model stays valid when the file is replaced by rename or
    deleted, but not when it is rewritten in place.

    Args:
        folder: holds config.json, and the lowrank weights unless `weights` says where they are.
        auto_class: the model class or Auto class to build (default: config.architectures[0], else AutoModel).
        weights: a lowrank file or folder of shards, when not in `folder`.
        dtype: the floating-point dtype to load in (default: the file's).
        strict: every tensor of the model must be in the file and every tensor of the file in the
            model (names as apply_factors matches them), else a CheckpointError. strict=False, as
            transformers' from_pretrained: the file's extra tensors are left out, and the model's
            tensors that the file lacks (a new task head) are initialised as transformers does.
        output_loading_info: also return the LoadResult: (model, LoadResult).
        fuse: stack the A factors of sibling layers that read one input (q/k/v, gate/up), so
            their A·x runs as one product (fuse_siblings; it copies those A's out of the file once),
            and store each B in the memory order its dtype runs fastest (lay_out_factors: float32
            by columns, copied once).

    Returns:
        The model in eval mode (with output_loading_info, the pair (model, LoadResult)).

    Example:
        >>> model = load_pretrained("minilm.lowrank/")
        >>> model(**tokenizer(["a sentence"], return_tensors="pt")).last_hidden_state
        >>> model, info = load_pretrained("bert.lowrank/", BertForSequenceClassification, strict=False,
        ...                               output_loading_info=True)  # info.missing_keys: the new head
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: has no config.json; give the model's folder, and weights=PATH for its lowrank file"
        )
    model, result = build_and_load(
        folder, auto_class, weights=weights, dtype=dtype, strict=strict, fix=PRETRAINED_FIX, fuse=fuse
    )
    return (model, result) if output_loading_info else model


PRETRAINED_FIX = "pass the model class it was saved from as auto_class, or strict=False to load what matches"


def build_and_load(
    folder: Path,
    auto_class: type | None,
    *,
    weights: str | Path | None,
    dtype: torch.dtype | None,
    strict: bool,
    fix: str,
    fuse: bool = True,
) -> tuple[nn.Module, LoadResult]:
    """load_pretrained's work, a file that does not fit the model refused with `fix`: the caller's own
    words (evaluate and heal, which take no model class nor strict, say which model to give instead)."""
    model = build_empty(folder, auto_class, feature="load_pretrained")
    return model, _load_built(model, weights or folder, dtype, strict, fix, fuse=fuse)


def build_empty(folder: str | Path, auto_class: type | None = None, *, feature: str = "build_empty") -> nn.Module:
    """The transformers model of `folder`'s config.json on the meta device: its structure, no weight allocated.

    Parameters and buffers are meta tensors (shapes and dtypes, no values) until a loader gives them
    the file's tensors (load_tensors) or moves them off meta. The folder's own code never runs.

    Args:
        folder: holds config.json.
        auto_class: the model class or Auto class to build (default: config.architectures[0], else AutoModel).
        feature: what needs transformers, named in the install hint when it is missing.

    Example:
        >>> model = build_empty("SmolLM2/")  # LlamaForCausalLM, every tensor on meta
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: has no config.json; give the folder of a transformers model")
    transformers = require_transformers(feature)
    config = _read_config(transformers, folder)
    return _build(transformers, config, auto_class or _architecture(transformers, config), folder)


def load_tensors(
    model: nn.Module,
    checkpoint: Checkpoint,
    names: list[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LoadResult:
    """Load part of a model built on meta: the tensors `names` (model names), from a dense or lowrank checkpoint.

    A weight the file holds as factors replaces its module by a LowRankLinear / LowRankEmbedding, as
    apply_factors does; a tied tensor is loaded once, under whichever of its names is asked, into
    every module holding it. The model's other tensors are left as they are (on meta), so a model
    can be loaded a part at a time. File names are matched to the model's as apply_factors matches them.

    Args:
        model: the whole model (names are its own), its parameters on the meta device.
        checkpoint: an open checkpoint (io.checkpoint.open_checkpoint).
        names: the model's parameters and persistent buffers to load.
        dtype: the floating-point dtype to load in (default: the file's). Tensors kept in the file's
            dtype on the CPU map the file instead of copying it.
        device: where the tensors go (default: the CPU).

    Returns:
        A LoadResult: missing_keys are those of `names` that the file lacks; unexpected_keys are
        the file's tensors that match nothing in the whole model. Nothing is raised for either.
    """
    tensors = _model_tensors(model)
    only = {id(tensors[name]) for name in names}
    plan = _plan(model, checkpoint, dtype, strict=False, fix="", only=only, device=device)
    _replace_modules(model, plan.factored)
    _load_dense(model, plan.dense)
    return plan.result


def factored_names(model: nn.Module, checkpoint: Checkpoint) -> list[str]:
    """The model's names of the weights that `checkpoint` holds as factors (none for dense weights)."""
    records = _records(checkpoint)
    factor_of = {f for name in records for f in factor_names(name)}
    names = [*records, *(name for name in checkpoint.entries if name not in factor_of)]
    target_of = _match_names(model, names, _model_tensors(model))
    return [target_of[name] for name in records if name in target_of]


def load_sentence_transformer(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    strict: bool = True,
):
    """A SentenceTransformer from a compressed sentence-transformers folder, its factors running as factors.

    `lowrank compress` of a sentence-transformers folder keeps modules.json, the pooling and
    normalisation modules' folders and the tokenizer beside the lowrank weights; this builds the
    whole pipeline from them, as SentenceTransformer(folder) would from the dense folder, with the
    transformer loaded as load_pretrained loads it (on meta first, the file mapped, never dense).
    Offline; the folder's own code (trust_remote_code) never runs.

    Args:
        folder: the compressed folder: modules.json, config.json and lowrank safetensors.
        dtype: the floating-point dtype of the transformer's tensors (default: the file's).
        device: where the model runs ("cpu", "cuda", "cuda:1"; default: sentence-transformers' choice).
        strict: as for load_pretrained: the file's tensors and the transformer's must match both ways.

    Returns:
        A sentence_transformers.SentenceTransformer (needs the `sentence-transformers` extra).

    Example:
        >>> model = load_sentence_transformer("minilm.lowrank/")
        >>> model.encode(["a sentence", "another one"]).shape
        (2, 384)
    """
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        raise CheckpointError(
            f"{folder}: has no modules.json, so it is no sentence-transformers folder; compress the"
            " sentence-transformers folder itself, or load a plain transformers folder with load_pretrained"
        )
    sentence_transformers = require_extra("sentence_transformers", "sentence-transformers", "load_sentence_transformer")
    transformers = require_transformers("load_sentence_transformer")
    # sentence-transformers builds its Transformer module's model with from_pretrained, which a lowrank
    # folder refuses; its loader takes a class per modules.json type (_load_with_module_classes, private
    # but meant for models "the normal path cannot reload"), and that class loads the factors instead.
    try:
        from sentence_transformers.base.modules import Transformer

        sentence_transformers.SentenceTransformer._load_with_module_classes  # noqa: B018 - present since 6.2
    except (ImportError, AttributeError):
        raise MissingExtraError(
            "load_sentence_transformer needs sentence-transformers 6.2 or newer;"
            " pip install -U 'lowrank[sentence-transformers]'"
        ) from None

    class _FactoredTransformer(Transformer):
        """A Transformer module whose model is loaded from the lowrank file instead of dense weights."""

        def _load_model(self, model_name_or_path, transformer_task, config, backend, *args, **model_kwargs):
            where = Path(model_name_or_path) / (model_kwargs.get("subfolder") or "")
            if backend != "torch" or transformer_task != "feature-extraction":
                raise CheckpointError(
                    f"{where}: a {transformer_task} module on backend {backend} cannot run lowrank factors;"
                    " only a torch feature-extraction Transformer can"
                )
            model = _build(transformers, config, transformers.AutoModel, where)
            _load_built(model, where, dtype, strict, "load the folder it was compressed from, or pass strict=False")
            return model

    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    refs = {str(entry.get("type", "")) for entry in modules if isinstance(entry, dict)}
    classes = {ref: _FactoredTransformer for ref in refs if ref.rsplit(".", 1)[-1] == "Transformer"}
    if not classes:
        raise CheckpointError(f"{folder / 'modules.json'}: names no Transformer module, whose weights lowrank holds")
    model = sentence_transformers.SentenceTransformer._load_with_module_classes(
        str(folder), classes, device=device, local_files_only=True, trust_remote_code=False
    )
    for module in model.modules():
        if type(module) is _FactoredTransformer:
            module.__class__ = Transformer  # a plain Transformer from now on: save() writes its usual type
    return model.eval()


def _read_config(transformers, folder: Path):
    try:  # never run the folder's own code (auto_map), nor ask whether to
        return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except config_errors() as exc:
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CheckpointError(
            f"{folder / 'config.json'}: cannot be read as a transformers config ({problem}); give the folder"
            " of a transformers model, with the config.json it was saved with"
        ) from None


def _build(transformers, config, model_class: type, folder: Path) -> nn.Module:
    """The model of `config` on the meta device: no weight is allocated."""
    try:
        with torch.device("meta"):
            if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
                return model_class._from_config(config)
            return model_class.from_config(config, trust_remote_code=False)
    except config_errors() as exc:
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CheckpointError(
            f"{folder / 'config.json'}: cannot be built as {getattr(model_class, '__name__', model_class)}"
            f" ({problem}); give the folder of a transformers model, with the config.json it was saved with"
        ) from None


def _load_built(
    model: nn.Module, weights: str | Path, dtype: torch.dtype | None, strict: bool, fix: str, *, fuse: bool = True
) -> LoadResult:
    """A model built on meta, given the file's factors and tensors; what the file lacks is initialised
    (strict=False) or refused (strict, the message ending in `fix`), so nothing is left on meta;
    siblings' A's stacked (fuse); the model ends in eval mode."""
    with open_checkpoint(weights) as checkpoint:
        plan = _plan(model, checkpoint, dtype, strict=strict, fix=fix)
    _replace_modules(model, plan.factored)
    _load_dense(model, plan.dense)
    _initialize_missing(model)
    if fuse:
        fuse_siblings(model)
        lay_out_factors(model)
    model.eval()
    return plan.result


def save_factors(model: nn.Module, path: str | Path, *, force: bool = False) -> Path:
    """Write a factored model in the lowrank format, for `lowrank expand` or further use.

    Every LowRankLinear / LowRankEmbedding is written as NAME.B / NAME.A under the name of the
    weight it replaced; every other parameter and persistent buffer is written as it is. A tensor
    shared by several modules (tied weights) is written once, under its first name.

    Each factor record's rel_error is the error the factors had against the dense weight they
    were made from (the file's record, or from_linear's measurement); factors of unknown origin
    record 0.0, the error of the factored model against itself. After fine-tuning, the recorded
    value still describes the original factorization.

    The output appears whole or not at all, and never replaces one that exists unless `force`.

    Args:
        model: the model; `model.config` (transformers) is saved beside the weights when present.
        path: a .safetensors file, or a folder that receives model.lowrank.safetensors, config.json
            and a README.md (named so that transformers' from_pretrained refuses the folder instead
            of loading it with random weights; load_pretrained reads it).
        force: replace `path` if it exists. Over a folder, its weights, config.json and README.md
            (its model card kept) are replaced; the rest it holds (tokenizer, modules.json,
            1_Pooling/…) is kept, but for weight files of other formats, which would be stale.

    Returns:
        The path of the safetensors file written.

    Example:
        >>> save_factors(model, "tuned.lowrank/")  # then: lowrank expand tuned.lowrank/
    """
    path = Path(path)
    into_folder = not path.name.endswith(".safetensors")
    if path.exists() and not force:
        raise OutputError(f"{path}: already exists; pass {arg('force')} to overwrite it or choose another path")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist; create it first")
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(FolderOutput(path, force=force)) if into_folder else None
        file = folder.path / WEIGHTS_NAME if folder else path
        writer = stack.enter_context(
            SafetensorsWriter(file, display=path / WEIGHTS_NAME if folder else None, force=force)
        )
        _write_factors(model, writer)
        writer.commit()
        if folder is not None:
            config = getattr(model, "config", None)
            try:
                card = None
                if force and path.is_dir():  # over a model folder: its tokenizer, modules.json… stay
                    replaced = {WEIGHTS_NAME, README, *(["config.json"] if hasattr(config, "save_pretrained") else [])}
                    keep_the_rest(path, folder.path, replaced)
                    card = (path / README).read_text(encoding="utf-8") if (path / README).is_file() else None
                if hasattr(config, "save_pretrained"):
                    config.save_pretrained(str(folder.path))
                write_readme(folder.path, path.name, card, compressed=True)
            except OSError as exc:
                raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); check free space") from None
            folder.commit()
    return path / WEIGHTS_NAME if into_folder else path


def _write_factors(model: nn.Module, writer: SafetensorsWriter) -> None:
    records: dict[str, FactorRecord] = {}
    written: set[int] = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, (LowRankLinear, LowRankEmbedding)) or id(module.B) in written:
            continue
        written.update((id(module.B), id(module.A)))
        b, a = module.B.detach(), module.A.detach()
        shape = (b.shape[0], a.shape[1])
        if getattr(module, "transposed", False):
            b, a, shape = a.t(), b.t(), (a.shape[1], b.shape[0])  # Conv1D stores Wᵀ = Aᵀ·Bᵀ
        name = f"{prefix}.weight" if prefix else "weight"
        for factor_name, factor in zip(factor_names(name), (b, a), strict=True):
            writer.add_tensor(factor_name, factor)
        records[name] = FactorRecord(shape, CODE_OF[b.dtype], b.shape[1], module.rel_error or 0.0)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in written:
            written.add(id(tensor))
            writer.add_tensor(name, tensor.detach())
    writer.metadata = encode_metadata({"format": "pt"}, records)


def _architecture(transformers, config) -> type:
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
    return transformers.AutoModel


# --- planning: everything is read and checked before the model is touched ------------------------


@dataclass
class _Plan:
    factored: list[_MatchedFactors]
    dense: dict[str, torch.Tensor]  # model name -> the file's tensor
    result: LoadResult


def _plan(
    model: nn.Module,
    checkpoint: Checkpoint,
    dtype: torch.dtype | None,
    *,
    strict: bool,
    fix: str,
    only: set[int] | None = None,
    device: str | torch.device | None = None,
) -> _Plan:
    """What to load into `model`, read and checked: every tensor, or only those whose id is in `only`
    (a part of the model; then a checkpoint with no lowrank metadata is read as dense weights)."""
    records = factor_records(checkpoint) if only is None else _records(checkpoint)
    factor_of = {f: name for name in records for f in factor_names(name)}
    tensors, owners = _model_tensors(model), _owners(model)
    names = [*records, *(name for name in checkpoint.entries if name not in factor_of)]
    target_of = _match_names(model, names, tensors)
    covered = {id(tensors[target]) for target in target_of.values()}
    wanted = [(name, tensor) for name, tensor in _state_tensors(model) if only is None or id(tensor) in only]
    result = LoadResult(
        missing_keys=[name for name, tensor in wanted if id(tensor) not in covered],
        unexpected_keys=[name for name in names if name not in target_of],
    )
    if only is not None:
        target_of = {name: target for name, target in target_of.items() if id(tensors[target]) in only}
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(_mismatch(model, checkpoint.source, result, fix))

    factored = []
    for name, record in records.items():
        if name not in target_of:
            continue
        target = target_of[name]
        current = tensors[target]
        if tuple(current.shape) != record.shape:
            raise CheckpointError(
                f"{checkpoint.source}: tensor '{name}' is {list(record.shape)} but the model's '{target}' is"
                f" {list(current.shape)}; load it into the model it was compressed from"
            )
        _check_owners(owners[id(current)], checkpoint.source, name)
        b, a = (_load(checkpoint, factor, current, dtype, device) for factor in factor_names(name))
        factored.append(_MatchedFactors(name, target, record, b, a))

    dense = {}
    for name in names[len(records) :]:
        if name not in target_of:
            continue
        target = target_of[name]
        entry, current = checkpoint.entries[name], tensors[target]
        if entry.shape != tuple(current.shape):
            raise CheckpointError(
                f"{checkpoint.source}: tensor '{name}' is {list(entry.shape)} but the model's '{target}' is"
                f" {list(current.shape)}; load it into the model it was compressed from"
            )
        dense[target] = _load(checkpoint, name, current, dtype, device)
    return _Plan(factored, dense, result)


def _records(checkpoint: Checkpoint) -> dict[str, FactorRecord]:
    """The factor records of a lowrank checkpoint; none for one without lowrank metadata (dense weights)."""
    if not any(METADATA_KEY in (shard.metadata or {}) for shard in checkpoint.files):
        return {}
    return factor_records(checkpoint)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under each of its names (tied weights have several)."""
    tensors = dict(model.named_buffers(remove_duplicate=False))
    tensors.update(model.named_parameters(remove_duplicate=False))
    return tensors


def _state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a load must fill, as torch's load_state_dict counts it: parameters and persistent buffers."""
    return [(name, tensor) for name, tensor in model.state_dict(keep_vars=True).items() if tensor is not None]


def _match_names(model: nn.Module, names: list[str], tensors: dict) -> dict[str, str]:
    """File name -> model name, for each name the model has: exactly, else with the model's
    base_model_prefix added or removed (whichever way matches most; names that match no way are left out)."""
    prefix = base_prefix(model)
    variants = {name: prefix_variants(name, prefix) for name in names}
    ways = range(len(prefix_variants("", prefix)))  # as it is, prefix added, prefix removed
    way = max(ways, key=lambda k: sum(v[k] in tensors for v in variants.values()))  # the first of equals
    return {name: v[way] for name, v in variants.items() if v[way] in tensors}


def _mismatch(model: nn.Module, source: Path, result: LoadResult, fix: str) -> str:
    """One line: what the file has that the model has not, and the other way round."""

    def some(names: list[str]) -> str:
        return ", ".join(f"'{name}'" for name in names[:3]) + (", …" if len(names) > 3 else "")

    problems = []
    if result.unexpected_keys:
        count = len(result.unexpected_keys)
        problems.append(f"{count} of its tensors are not in the model ({some(result.unexpected_keys)})")
    if result.missing_keys:
        count = len(result.missing_keys)
        problems.append(f"{count} of the model's are not in the file ({some(result.missing_keys)})")
    prefix = base_prefix(model)
    rule = f" (or differ by the prefix '{prefix}.')" if prefix else ""
    return (
        f"{source}: does not fit {type(model).__name__}: {' and '.join(problems)}; names must match exactly{rule};"
        f" {fix}"
    )


def _check_owners(owners: list[tuple[nn.Module, str, bool]], source: Path, name: str) -> None:
    """Only Linear, Conv1D and Embedding weights can run as factors (every module tied to it, too)."""
    for owner, attr, _ in owners:
        if attr == "weight" and (isinstance(owner, (nn.Linear, nn.Embedding)) or is_conv1d(owner)):
            if isinstance(owner, nn.Embedding) and owner.max_norm is not None:
                raise CheckpointError(
                    f"{source}: tensor '{name}' belongs to an Embedding with max_norm, which factors cannot run;"
                    f" compress it with exclude=['{name}'] (CLI: --exclude '{name}')"
                )
            continue
        kind = "a conv kernel" if isinstance(owner, nn.modules.conv._ConvNd) else f"{type(owner).__name__}.{attr}"
        raise CheckpointError(
            f"{source}: tensor '{name}' is {kind}, which cannot run as factors (only Linear, Conv1D and Embedding"
            f" weights can); compress it with exclude=['{name}'] (CLI: --exclude '{name}'), or expand the file"
        )


def _load(
    checkpoint: Checkpoint,
    name: str,
    current: torch.Tensor,
    dtype: torch.dtype | None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The file's tensor in the dtype and device of the one it replaces (the file's own dtype and the CPU
    for meta tensors), or in `dtype` and on `device` when given.

    A tensor kept as stored (its dtype, on the CPU) stays backed by the mapped file, so only the
    pages a forward touches are ever read; a dtype or device change reads it whole and converts it.
    """
    stored = torch_dtype(checkpoint.entries[name].dtype)
    if device is None:
        device = "cpu" if current.is_meta else current.device
    device = torch.device(device)
    wanted = stored
    if stored.is_floating_point:
        wanted = dtype or (stored if current.is_meta else current.dtype)
    if device.type == "cpu" and wanted == stored:
        return checkpoint.mapped(name)
    return checkpoint.read(name).to(device=device, dtype=wanted)


# --- changing the model ---------------------------------------------------------------------------


def _replace_modules(model: nn.Module, factored: list[_MatchedFactors]) -> None:
    """Each module holding a factorized weight (under any of its tied names) becomes a low-rank layer."""
    owners = _owners(model)
    replaced: dict[int, nn.Module] = {}
    for item in factored:
        weight = model.get_parameter(item.target)
        b = nn.Parameter(item.b, requires_grad=weight.requires_grad)
        a = nn.Parameter(item.a, requires_grad=weight.requires_grad)
        for module, _, _ in owners[id(weight)]:
            if id(module) in replaced:
                continue
            if is_conv1d(module):
                # Conv1D: y = x·W + b with W (in, out) = B·A, so y = (x·B)·A + b: A_lin = Bᵀ, B_lin = Aᵀ.
                layer = LowRankLinear.from_factors(a.detach().t(), b.detach().t(), module.bias)
                layer.transposed = True
            elif isinstance(module, nn.Embedding):
                layer = LowRankEmbedding.from_factors(b, a, module.padding_idx)
            else:
                layer = LowRankLinear.from_factors(b, a, module.bias)
            layer.rel_error = item.record.rel_error
            replaced[id(module)] = layer
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in replaced:
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replaced[id(module)])


def _load_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    owners = _owners(model)
    tensors = _model_tensors(model)
    for target, value in dense.items():
        current = tensors[target]
        if isinstance(current, nn.Parameter):
            value = nn.Parameter(value, requires_grad=current.requires_grad and value.is_floating_point())
        for module, attr, is_parameter in owners[id(current)]:
            (module._parameters if is_parameter else module._buffers)[attr] = value


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id(tensor) -> every (module, attribute, is_parameter) that holds it."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in table.items():
                if tensor is not None:
                    owners.setdefault(id(tensor), []).append((module, attr, is_parameter))
    return owners


def _initialize_missing(model: nn.Module) -> None:
    """What the file did not give a model built on meta: buffers computed in __init__ (position ids,
    rotary frequencies) and, with strict=False, tensors the file lacks (a new head).

    Built on the meta device they have no values; transformers computes them the way its own
    from_pretrained does: every loaded tensor is marked initialized, then initialize_weights runs.
    """
    missing = [(name, tensor) for name, tensor in _model_tensors(model).items() if tensor.is_meta]
    if not missing:
        return
    if not hasattr(model, "initialize_weights"):
        raise MissingExtraError(
            f"{type(model).__name__}: '{missing[0][0]}' must be initialised, which needs transformers 5 or"
            " newer; pip install -U transformers"
        )
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            tensor._is_hf_initialized = True
    owners = _owners(model)
    done: set[int] = set()
    for _, tensor in missing:
        if id(tensor) in done:
            continue
        done.add(id(tensor))
        value = torch.empty_like(tensor, device="cpu")
        if isinstance(tensor, nn.Parameter):  # one Parameter for every module holding it: ties stay tied
            value = nn.Parameter(value, requires_grad=tensor.requires_grad)
        for module, attr, is_parameter in owners[id(tensor)]:
            (module._parameters if is_parameter else module._buffers)[attr] = value
    model.initialize_weights()
    for tensor in [*model.parameters(), *model.buffers()]:
        if hasattr(tensor, "_is_hf_initialized"):
            del tensor._is_hf_initialized


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a SentenceTransformer (or any sentence-transformers model), whose
    weights a compressed folder holds; any other model itself. Recognized by the `transformers_model`
    attribute sentence-transformers gives its models, so sentence-transformers need not be imported."""
    inner = getattr(model, "transformers_model", None)
    return inner if isinstance(inner, nn.Module) and inner is not model else model


__all__ = [
    "LoadResult",
    "apply_factors",
    "build_empty",
    "factored_names",
    "load_pretrained",
    "load_sentence_transformer",
    "load_tensors",
    "save_factors",
]
