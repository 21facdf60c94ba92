"""Running a lowrank file as a model: factors become LowRankLinear / LowRankEmbedding layers.

apply_factors works on any torch model; load_pretrained builds a transformers model on the meta
device first, so no dense weight is ever allocated; save_factors writes a factored model back
in the lowrank format, which `lowrank expand` reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowrank_cli.errors import CheckpointError, MissingExtraError, OutputError, arg
from lowrank_cli.io.checkpoint import Checkpoint, open_checkpoint
from lowrank_cli.io.dtypes import CODE_OF, torch_dtype
from lowrank_cli.io.fileformat import FactorRecord, encode_metadata, factor_names, factor_records
from lowrank_cli.io.hfconfig import config_errors, is_conv1d, require_transformers
from lowrank_cli.io.outputs import FolderOutput, lowrank_name, write_readme
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.nn.linear import LowRankEmbedding, LowRankLinear

WEIGHTS_NAME = lowrank_name("model.safetensors")  # what from_pretrained does not look for


@dataclass
class _Factored:
    """One factorized tensor of the file, matched to the model."""

    name: str  # in the file
    target: str  # in the model
    record: FactorRecord
    b: torch.Tensor  # (m, r)
    a: torch.Tensor  # (r, n)


def apply_factors(model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a lowrank file (or folder of shards) into `model`, running every factorized weight as factors.

    Each module whose weight the file holds as NAME.B / NAME.A is replaced by a LowRankLinear (for
    nn.Linear and GPT-2 Conv1D) or a LowRankEmbedding (for nn.Embedding); modules tied to it (an
    lm_head sharing the embedding's weight) are replaced too and share the factors. Every other
    tensor of the file is loaded as it is. Tensors of the model that the file lacks are kept.

    Names are matched exactly, or with the model's `base_model_prefix` added or removed (a file saved
    from BertModel loads into BertForSequenceClassification). Nothing is changed unless every name
    and shape fits.

    Args:
        model: any torch model; its parameters may be on the meta device.
        path: a lowrank .safetensors file, a folder of lowrank shards, or their index.
        dtype: the floating-point dtype to load tensors in. By default each tensor takes the dtype
            of the model's tensor it replaces, or the file's own for tensors on the meta device.
            Tensors that keep the file's dtype on the CPU map the file instead of copying it (see
            load_pretrained); any other is read and converted.

    Returns:
        The same model, changed in place.

    Example:
        >>> model = apply_factors(BertModel(config), "model.lowrank.safetensors").eval()
    """
    with open_checkpoint(path) as checkpoint:
        factored, dense = _plan(model, checkpoint, dtype)
    _replace_modules(model, factored)
    _load_dense(model, dense)
    return model


def load_pretrained(
    folder: str | Path,
    auto_class: type | None = None,
    *,
    weights: str | Path | None = None,
    dtype: torch.dtype | None = None,
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

    Returns:
        The model in eval mode.

    Example:
        >>> model = load_pretrained("minilm.lowrank/")
        >>> model(**tokenizer(["a sentence"], return_tensors="pt")).last_hidden_state
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: has no config.json; give the model's folder, and weights=PATH for its lowrank file"
        )
    transformers = require_transformers("load_pretrained")
    try:  # never run the folder's own code (auto_map), nor ask whether to
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        model_class = auto_class or _architecture(transformers, config)
        with torch.device("meta"):
            if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
                model = model_class._from_config(config)
            else:
                model = model_class.from_config(config, trust_remote_code=False)
    except config_errors() as exc:
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CheckpointError(
            f"{folder / 'config.json'}: cannot be read as a transformers config ({problem}); give the folder"
            " of a transformers model, with the config.json it was saved with"
        ) from None
    with open_checkpoint(weights or folder) as checkpoint:
        factored, dense = _plan(model, checkpoint, dtype)
        _require_complete(model, checkpoint, factored, dense)
    _replace_modules(model, factored)
    _load_dense(model, dense)
    _rebuild_buffers(model)
    return model.eval()


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
        force: replace `path` if it exists.

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
                if hasattr(config, "save_pretrained"):
                    config.save_pretrained(str(folder.path))
                write_readme(folder.path, path.name, None, compressed=True)
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


def _plan(
    model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype | None
) -> tuple[list[_Factored], dict[str, torch.Tensor]]:
    records = factor_records(checkpoint)
    factor_of = {f: name for name in records for f in factor_names(name)}
    tensors, owners = _model_tensors(model), _owners(model)
    names = [*records, *(name for name in checkpoint.entries if name not in factor_of)]
    target_of = _match_names(model, checkpoint.source, names, tensors)

    factored = []
    for name, record in records.items():
        target = target_of[name]
        current = tensors[target]
        if tuple(current.shape) != record.shape:
            raise CheckpointError(
                f"{checkpoint.source}: tensor '{name}' is {list(record.shape)} but the model's '{target}' is"
                f" {list(current.shape)}; load it into the model it was compressed from"
            )
        _check_owners(owners[id(current)], checkpoint.source, name)
        b, a = (_load(checkpoint, factor, current, dtype) for factor in factor_names(name))
        factored.append(_Factored(name, target, record, b, a))

    dense = {}
    for name in names[len(records) :]:
        target = target_of[name]
        entry, current = checkpoint.entries[name], tensors[target]
        if entry.shape != tuple(current.shape):
            raise CheckpointError(
                f"{checkpoint.source}: tensor '{name}' is {list(entry.shape)} but the model's '{target}' is"
                f" {list(current.shape)}; load it into the model it was compressed from"
            )
        dense[target] = _load(checkpoint, name, current, dtype)
    return factored, dense


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under each of its names (tied weights have several)."""
    tensors = dict(model.named_buffers(remove_duplicate=False))
    tensors.update(model.named_parameters(remove_duplicate=False))
    return tensors


def _match_names(model: nn.Module, source: Path, names: list[str], tensors: dict) -> dict[str, str]:
    """File name -> model name: exactly, else with the model's base_model_prefix added or removed."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    renames = [lambda n: n]
    if prefix:
        renames += [lambda n: f"{prefix}.{n}", lambda n: n.removeprefix(f"{prefix}.")]
    for rename in renames:
        if all(rename(name) in tensors for name in names):
            return {name: rename(name) for name in names}
    exact = [rename for rename in renames if any(rename(name) in tensors for name in names)]
    rename = max(exact or renames[:1], key=lambda r: sum(r(name) in tensors for name in names))
    missing = next(name for name in names if rename(name) not in tensors)
    tried = f", nor as '{prefix}.{missing}' or without '{prefix}.'" if prefix else ""
    raise CheckpointError(
        f"{source}: tensor '{missing}' is not in the model ({type(model).__name__}){tried}; names must match"
        " exactly (or differ by the base model prefix); load the file into the model class it was saved from"
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


def _load(checkpoint: Checkpoint, name: str, current: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The file's tensor in the dtype and device of the one it replaces (the file's own dtype for meta tensors).

    A tensor kept as stored (its dtype, on the CPU) stays backed by the mapped file, so only the
    pages a forward touches are ever read; a dtype or device change reads it whole and converts it.
    """
    stored = torch_dtype(checkpoint.entries[name].dtype)
    device = torch.device("cpu") if current.is_meta else current.device
    wanted = stored
    if stored.is_floating_point:
        wanted = dtype or (stored if current.is_meta else current.dtype)
    if device.type == "cpu" and wanted == stored:
        return checkpoint.mapped(name)
    return checkpoint.read(name).to(device=device, dtype=wanted)


def _require_complete(
    model: nn.Module, checkpoint: Checkpoint, factored: list[_Factored], dense: dict[str, torch.Tensor]
) -> None:
    """Every parameter and persistent buffer is in the file: nothing may be left random or on meta."""
    tensors = _model_tensors(model)
    covered = {id(tensors[f.target]) for f in factored} | {id(tensors[name]) for name in dense}
    for module_name, module in model.named_modules():
        persistent = module._buffers.keys() - module._non_persistent_buffers_set
        for attr in sorted(module._parameters.keys() | persistent):
            tensor = getattr(module, attr)
            if tensor is None or id(tensor) in covered:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            raise CheckpointError(
                f"{checkpoint.source}: has no tensor '{name}' for {type(model).__name__}; pass the model class it"
                " was saved from as auto_class, or build the model yourself and call apply_factors"
            )


# --- changing the model ---------------------------------------------------------------------------


def _replace_modules(model: nn.Module, factored: list[_Factored]) -> None:
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


def _rebuild_buffers(model: nn.Module) -> None:
    """Buffers computed in __init__ that the file does not hold (position ids, rotary frequencies).

    Built on the meta device they have no values; transformers recomputes them the way its own
    from_pretrained does: every loaded tensor is marked initialized, then initialize_weights runs.
    """
    missing = [(name, buffer) for name, buffer in model.named_buffers() if buffer.is_meta]
    if not missing:
        return
    if not hasattr(model, "initialize_weights"):
        raise MissingExtraError(
            f"{type(model).__name__}: buffer '{missing[0][0]}' must be recomputed, which needs transformers 5 or"
            " newer; pip install -U transformers"
        )
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            tensor._is_hf_initialized = True
    owners = _owners(model)
    for _, buffer in missing:
        value = torch.empty_like(buffer, device="cpu")
        for module, attr, _ in owners[id(buffer)]:
            module._buffers[attr] = value
    model.initialize_weights()
    for tensor in [*model.parameters(), *model.buffers()]:
        if hasattr(tensor, "_is_hf_initialized"):
            del tensor._is_hf_initialized


__all__ = ["apply_factors", "load_pretrained", "save_factors"]
