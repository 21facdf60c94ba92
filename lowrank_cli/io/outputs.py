"""Where outputs go, and how they appear: whole, atomically, or not at all.

A single file is streamed into a temporary file and renamed into place. A folder output (for a
folder or index input: one file per input file under the same names, the index if the input had
one or several files, and the input folder's other files such as config.json) is built under a
temporary name beside OUT and renamed into place at the end.

How OUT is read (`resolve_output`): a folder or index in gives a folder out, unless OUT ends in
.safetensors (then every tensor goes into that one file). For a single-file input, OUT that ends
in "/" or is an existing folder means "into this folder", under the input's file name; a folder
named with "/" that does not exist yet is made (its parent must exist), atomically with the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from lowrank_cli.errors import OutputError, UsageError, arg
from lowrank_cli.io.checkpoint import INDEX_SUFFIX, Checkpoint, ShardFile
from lowrank_cli.io.paths import require_file
from lowrank_cli.io.publish import current_umask, make_temp, publish, remove_temp, sweep_stale_temps, sync
from lowrank_cli.io.writer import SafetensorsWriter

LOWRANK = ".lowrank"  # the part of a name that compress adds and expand takes away


def default_output(checkpoint: Checkpoint, suffix: str) -> Path:
    """`<input stem><suffix>` beside the input, without a `.lowrank` the input's name carries.

    compress: model.safetensors -> model.lowrank.safetensors, folder m/ -> m.lowrank/;
    expand: model.lowrank.safetensors -> model.dense.safetensors, m.lowrank/ -> m.dense/ (never
    the original's name).
    """
    source = checkpoint.source
    if not checkpoint.is_folder:
        return source.with_name(source.stem.removesuffix(LOWRANK) + suffix)
    folder = source if source.is_dir() else source.parent
    return folder.with_name(folder.name.removesuffix(LOWRANK) + suffix.removesuffix(".safetensors"))


def resolve_output(checkpoint: Checkpoint, out: str | os.PathLike | None, suffix: str) -> tuple[Path, bool]:
    """The path to write and whether it is a folder (see the module's docstring)."""
    if out is None:
        return default_output(checkpoint, suffix), checkpoint.is_folder
    text = os.fspath(out)
    path = Path(text)
    if checkpoint.is_folder:
        return path, not path.name.endswith(".safetensors")
    if path.is_dir():
        return path / checkpoint.source.name, False
    if text.endswith(("/", os.sep)):
        return path, True
    return path, False


def prepare_output(
    checkpoint: Checkpoint,
    out: str | os.PathLike | None,
    suffix: str,
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> tuple[Path, bool]:
    """resolve_output, then check_output: the path to write and whether it is a folder."""
    path, folder = resolve_output(checkpoint, out, suffix)
    return check_output(checkpoint, path, force=force, inputs=inputs), folder


def check_output(
    checkpoint: Checkpoint, out: Path, *, force: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Refuse an output that is an input (the checkpoint's, or one of `inputs`: a text, statistics…),
    exists (without force) or has no folder."""
    out = Path(out)
    folder = checkpoint.source if checkpoint.source.is_dir() else checkpoint.index_path and checkpoint.index_path.parent
    refuse_inputs(out, [checkpoint.source, *checkpoint.paths, folder, *inputs])
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to overwrite it or choose another -o")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist; create it first")
    return out


def refuse_inputs(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse, force or not, an output that is one of a run's `inputs` (files or folders; None and "" are
    no input), a folder that holds one, or a path inside an input folder: writing it would replace or
    change what the run reads. Every command checks its OUT here, before it reads or computes anything."""
    paths = [Path(given) for given in inputs if given is not None and os.fspath(given) != ""]
    out, resolved = Path(out), Path(out).resolve()
    for path in paths:
        if resolved == path.resolve() or _same_file(out, path):
            raise UsageError(f"{out}: is an input of this run; choose another {arg('out')}")
    for path in paths:
        if resolved in path.resolve().parents:
            raise UsageError(f"{out}: this folder holds the input {path}; choose another {arg('out')}")
    for path in paths:
        if path.is_dir() and path.resolve() in resolved.parents:
            raise UsageError(f"{out}: is inside the input folder {path}; choose an {arg('out')} outside it")


def require_kind(out: Path, *, folder: bool) -> None:
    """Refuse to replace a file by a folder or a folder by a file, even with force."""
    if out.exists() and out.is_dir() != folder:
        kind = "a folder" if out.is_dir() else "a file"
        raise OutputError(f"{out}: is {kind}; remove it or choose another -o")


def check_statistics_output(out: Path, folder: Path, text: Path, *, force: bool) -> None:
    """Refuse calibrate's statistics file `out` over an input (the model folder or a file in it, the text)
    or inside the model folder even with force, over a file without force, or where its folder does not exist."""
    refuse_inputs(out, [folder, text])
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give the statistics file's name with {arg('out')}")
    if out.exists() and not force:
        raise OutputError(f"{out}: exists; choose another output or pass {arg('force')}")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: its folder {out.parent} does not exist; create it or choose another output")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class FolderOutput:
    """A folder built under a temporary name beside OUT and renamed into place by commit().

    Without force, commit() never replaces a folder that exists by then (another run's output).
    """

    def __init__(self, out: Path, *, force: bool = False) -> None:
        self.out = out
        self.force = force
        try:
            self.path: Path | None = make_temp(out, folder=True)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write there ({exc.strerror or exc}); check the folder") from None

    def commit(self) -> None:
        new, out = self.path, self.out
        try:
            os.chmod(new, 0o777 & ~current_umask())
            sync(new)  # the index, config.json, README.md… reach the disk before the folder's name does
            publish(new, out, force=self.force)
            self.path = None
        except OSError as exc:
            raise OutputError(
                f"{out}: cannot write ({exc.strerror or exc}); check free space and permissions"
            ) from None

    def discard(self) -> None:
        if self.path is not None:
            remove_temp(self.path)
            self.path = None

    def __enter__(self) -> FolderOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class CheckpointOutput:
    """One output file, or a folder mirroring the input's files; commit() or nothing.

    names: how a folder input's weight files are named in the output folder: "lowrank" (compress:
    model.safetensors -> model.lowrank.safetensors, and a README.md saying how to load it), "dense"
    (expand: the names back, and the original README.md) or None (as the input's).
    `notes` says which temporaries of killed runs were removed beside OUT.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        out: Path,
        *,
        folder: bool,
        force: bool,
        names: Literal["lowrank", "dense"] | None = None,
    ) -> None:
        self.out = out
        self.force = force
        self.checkpoint = checkpoint
        self.sharded = folder  # one writer per input file, named as it is
        self.names = names if checkpoint.is_folder else None
        require_kind(out, folder=self.sharded)
        self.notes = sweep_stale_temps(out.parent)
        self._folder = FolderOutput(out, force=force) if self.sharded else None
        self._writers: dict[str, SafetensorsWriter] = {}

    def writer_for(self, shard: ShardFile) -> SafetensorsWriter:
        """The writer that takes this input shard's tensors."""
        key = shard.path.name if self.sharded else ""
        if key not in self._writers:
            path = self._folder.path / self._renamed(key) if self.sharded else self.out
            display = self.out / self._renamed(key) if self.sharded else None
            self._writers[key] = SafetensorsWriter(path, display=display, force=self.force and not self.sharded)
        return self._writers[key]

    @property
    def writers(self) -> list[SafetensorsWriter]:
        return list(self._writers.values())

    def commit(self) -> int:
        """Make the output appear under its name; returns the bytes of its safetensors files."""
        if not self.sharded:
            writer = self.writer_for(self.checkpoint.files[0])
            return writer.commit()
        size = sum(writer.commit() for writer in self.writers)
        try:
            if self.checkpoint.is_sharded:
                self._write_index()
            if self.checkpoint.is_folder:
                self._copy_companions()
        except OSError as exc:
            raise OutputError(
                f"{self.out}: cannot write ({exc.strerror or exc}); check free space and permissions"
            ) from None
        self._folder.commit()
        return size

    def discard(self) -> None:
        for writer in self._writers.values():
            writer.discard()  # never raises: every writer gets its turn
        if self._folder is not None:
            self._folder.discard()

    def __enter__(self) -> CheckpointOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def _renamed(self, name: str) -> str:
        return {"lowrank": lowrank_name, "dense": dense_name}.get(self.names, str)(name)

    def _write_index(self) -> None:
        weight_map, total = {}, 0
        for writer in self._writers.values():
            weight_map.update({tensor: writer.path.name for tensor in writer.tensor_names})
            total += writer.nbytes
        index_name = self.checkpoint.index_path.name if self.checkpoint.index_path else "model" + INDEX_SUFFIX
        index_name = self._renamed(index_name)
        text = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        (self._folder.path / index_name).write_text(text + "\n", encoding="utf-8")

    def _copy_companions(self) -> None:
        """config.json, tokenizer files…: what else the input folder holds, so loaders find it."""
        folder = self.checkpoint.source if self.checkpoint.source.is_dir() else self.checkpoint.source.parent
        taken = {p.name for p in self.checkpoint.paths}
        for path in sorted(folder.iterdir()):
            hidden = path.name.startswith(".")
            checkpoint_file = path.name in taken or path.name.endswith((".safetensors", INDEX_SUFFIX, *_OTHER_WEIGHTS))
            readme = path.name == README and self.names is not None
            if path.is_file() and not hidden and not checkpoint_file and not readme:
                shutil.copy2(path, self._folder.path / path.name)
        if self.names is not None:
            card = (folder / README).read_text(encoding="utf-8") if (folder / README).is_file() else None
            write_readme(self._folder.path, self.out.name, card, compressed=self.names == "lowrank")
        for module in _module_folders(folder):
            shutil.copytree(module, self._folder.path / module.name)


def lowrank_name(name: str) -> str:
    """A compressed folder's name for a weights file or index: model.safetensors -> model.lowrank.safetensors.

    transformers' from_pretrained looks for model.safetensors (or its index) and finds none, so it
    fails instead of loading the model with every factorized weight left random.
    """
    for suffix in (INDEX_SUFFIX, ".safetensors"):
        if name.endswith(suffix):
            stem = name.removesuffix(suffix)
            return name if stem.endswith(LOWRANK) else stem + LOWRANK + suffix
    return name


def dense_name(name: str) -> str:
    """The name lowrank_name took away: model.lowrank.safetensors -> model.safetensors."""
    for suffix in (INDEX_SUFFIX, ".safetensors"):
        if name.endswith(suffix):
            return name.removesuffix(suffix).removesuffix(LOWRANK) + suffix
    return name


README = "README.md"
_README_MARK = "<!-- lowrank: a compressed model -->"
_CARD_MARK = "<!-- lowrank: the original model card follows -->"
_README_TEXT = """{mark}
# A lowrank-compressed model

This folder holds a model compressed by lowrank: each factorized weight W is stored as two factors
`NAME.B` and `NAME.A` (W ≈ B·A) in its `*.lowrank.safetensors` files, whose `lowrank` metadata
lists them.
transformers cannot run the factors, so the weights are not named `model.safetensors`:
`AutoModel.from_pretrained` fails on this folder rather than load a model with those weights random.

Load it with lowrank, which runs the factors as they are:

```python
import lowrank_cli

model = lowrank_cli.load_pretrained("{folder}")
```

or make a dense copy that any loader reads: `lowrank expand {folder} -o {dense}`.
"""


def write_readme(folder: Path, name: str, card: str | None, *, compressed: bool) -> None:
    """README.md of a compressed folder `name` (how to load it, then the original card), or of an expanded
    one (the original card back, or none)."""
    original = card
    if card is not None and card.startswith(_README_MARK):  # ours: the original card follows our text, if any
        original = card.split(_CARD_MARK + "\n", 1)[1] if _CARD_MARK in card else None
    if compressed:
        dense = name.removesuffix(LOWRANK) + ".dense"
        text = _README_TEXT.format(mark=_README_MARK, folder=name, dense=dense)
        if original is not None:
            text += f"\n{_CARD_MARK}\n{original}"
    elif original is None:
        return
    else:
        text = original
    (folder / README).write_text(text, encoding="utf-8")


# The same weights in other formats (pytorch_model.bin beside the model.safetensors made from it, tf_model.h5…):
# copied, they would hold the dense model again inside a compressed folder, and be stale beside an expanded one.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz", ".pkl")


def keep_the_rest(old: Path, new: Path, replaced: set[str]) -> None:
    """Copy into the folder `new` what the folder `old` holds besides its weights and the `replaced` names.

    For an output written over a model folder: its tokenizer, modules.json, 1_Pooling/… stay beside the
    new weights, while weight files (*.safetensors, the index, other formats) would describe the old
    model and go. Hidden entries (other runs' temporaries) are left out. Raises OSError.
    """
    for path in sorted(old.iterdir()):
        weights = path.name.endswith((".safetensors", INDEX_SUFFIX, *_OTHER_WEIGHTS)) and not path.is_dir()
        if path.name.startswith(".") or path.name in replaced or weights:
            continue
        if path.is_dir():
            shutil.copytree(path, new / path.name)
        elif path.is_file():
            shutil.copy2(path, new / path.name)


def _module_folders(folder: Path) -> list[Path]:
    """The subfolders a sentence-transformers modules.json names (1_Pooling/, 2_Dense/…).

    Its loader needs every one, so they travel with the model; other subfolders (checkpoint-500/,
    onnx/) may be large and are not the model's, so they stay behind.
    """
    listing = folder / "modules.json"
    if not listing.exists():
        return []
    require_file(listing, "sentence-transformers reads it; replace it with the file itself")
    try:
        modules = json.loads(listing.read_text(encoding="utf-8"))
        paths = {module.get("path") for module in modules}
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    named = [folder / path for path in paths if isinstance(path, str) and path and not path.startswith(".")]
    # Only direct children: a path such as "../x" or "a/b" is not a module folder of this model.
    return sorted(path for path in named if path.is_dir() and path.parent == folder)
