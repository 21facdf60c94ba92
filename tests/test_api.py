"""The public Python API: what it exports, what it imports, and that it is what the CLI runs.

Each checkpoint function is called directly and must write the same bytes the CLI writes; the
factor step of every command × method × policy, on full-rank and low-rank input, ends in a
report whose errors hold on the files as written, or in one clean error line.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import fnmatch
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    assert_no_crash,
    by_name,
    cli,
    load,
    low_rank,
    relative_error,
    save,
    sha256,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_cli

# --- what the package exports and imports ----------------------------------------------------------


def _module_level_imports(path: Path) -> dict[str, list[str]]:
    """module -> names, for the `from lowrank_cli… import …` statements run when the module loads
    (not those under `if TYPE_CHECKING:` or inside functions)."""
    found: dict[str, list[str]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lowrank_cli":
            found.setdefault(node.module, []).extend(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update({a.name: [] for a in node.names if a.name.split(".")[0] == "lowrank_cli"})
    return found


def test_all_is_what_the_package_exports_and_each_name_resolves():
    imported = {
        name for names in _module_level_imports(ROOT / "lowrank_cli" / "__init__.py").values() for name in names
    }
    assert len(lowrank_cli.__all__) == len(set(lowrank_cli.__all__))
    assert set(lowrank_cli.__all__) == imported | set(lowrank_cli._LAZY)
    for name in lowrank_cli.__all__:
        assert getattr(lowrank_cli, name) is not None, name
    for name in ("factorize", "analyze", "compress", "expand", "extract"):
        doc = getattr(lowrank_cli, name).__doc__
        assert "Example" in doc, name  # a docstring with arguments and an example


def test_import_loads_neither_torch_nor_the_cli_libraries():
    code = "import sys, lowrank_cli; print(sorted(m for m in ('torch', 'typer', 'rich', 'numpy') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] == "lowrank_cli"}


CORE = ("lowrank_cli.errors",)
LINALG = (*CORE, "lowrank_cli.linalg")
IO = (*CORE, "lowrank_cli.io")
OPS = (*LINALG, "lowrank_cli.io", "lowrank_cli.ops")
NN = (*OPS, "lowrank_cli.nn")
MODEL = (*NN, "lowrank_cli.model")


@pytest.mark.parametrize(
    ("layer", "allowed"),
    [
        ("errors.py", ()),
        ("linalg", LINALG),
        ("io", IO),
        ("ops", OPS),
        ("nn", NN),
        ("model", MODEL),
        ("api.py", (*MODEL, "lowrank_cli.api")),  # anything but the CLI
        # the CLI alone may import the package itself (the public API), besides its own modules, errors and
        # the commands' defaults (ops.settings: plain values, no torch, as the package's enums come from)
        ("cli", ("lowrank_cli", *CORE, "lowrank_cli.cli", "lowrank_cli.ops.settings")),
    ],
)
def test_imports_point_one_way(layer, allowed):
    place = ROOT / "lowrank_cli" / layer
    for path in sorted(place.glob("*.py")) if place.is_dir() else [place]:
        for name in _imports(path):
            ok = any(name == a or (a != "lowrank_cli" and name.startswith(a + ".")) for a in allowed)
            assert ok, f"{path.relative_to(ROOT)} imports {name}"


def test_no_module_imports_another_modules_private_names():
    """A name one module needs from another is public there: a private one may change without notice."""
    for path in sorted((ROOT / "lowrank_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lowrank_cli":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"


def test_the_package_imports_only_errors_and_plain_types_when_it_loads():
    # everything else is imported on first use (_LAZY), so `import lowrank_cli` stays free of torch
    loaded = set(_module_level_imports(ROOT / "lowrank_cli" / "__init__.py"))
    assert loaded == {"lowrank_cli.errors", "lowrank_cli.ops.report", "lowrank_cli.ops.settings"}
    assert all(module.split(".")[1] not in ("cli", "__main__") for module in lowrank_cli._LAZY.values())


def test_core_imports_neither_typer_nor_rich():
    for path in sorted((ROOT / "lowrank_cli").rglob("*.py")):
        if "cli" in path.relative_to(ROOT / "lowrank_cli").parts[:1]:
            continue
        source = path.read_text(encoding="utf-8")
        assert "import typer" not in source and "import rich" not in source and "from rich" not in source, path


# --- factorize: one tensor -----------------------------------------------------------------------------


def test_factorize_keeps_the_rank_and_the_optimal_error():
    w = low_rank(80, 60, 50, seed=3)
    b, a = lowrank_cli.factorize(w, rank=10)
    assert b.shape == (80, 10) and a.shape == (10, 60) and b.dtype == a.dtype == torch.float32
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    optimal = np.sqrt((s[10:] ** 2).sum() / (s**2).sum())
    assert relative_error(w, b, a) == pytest.approx(optimal, rel=1e-4)


@pytest.mark.parametrize("method", ["exact", "randomized", "auto"])
def test_factorize_meets_an_error_bound_on_the_returned_factors(method):
    w = low_rank(300, 280, 280, seed=4)  # full rank
    b, a = lowrank_cli.factorize(w, max_error=0.3, method=method, seed=1)
    assert relative_error(w, b, a) <= 0.3
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    errors = np.sqrt(np.cumsum((s**2)[::-1])[::-1] / (s**2).sum())
    optimal_rank = int(np.argmax(np.append(errors, 0.0) <= 0.3))
    assert optimal_rank <= b.shape[1] <= 1.05 * optimal_rank + 1


def test_factorize_returns_the_input_dtype_within_its_rounding():
    w = low_rank(64, 48, 4, seed=5).to(torch.bfloat16)
    b, a = lowrank_cli.factorize(w, rank=4)
    assert b.dtype == a.dtype == torch.bfloat16 and b.shape == (64, 4) and a.shape == (4, 48)
    # W's own rounding to bfloat16 and that of B and A, each ≤ ε/2 relative per entry, are all that remain
    assert relative_error(w, b, a) < 2 * torch.finfo(torch.bfloat16).eps


def test_factorize_of_a_zero_matrix_keeps_nothing():
    b, a = lowrank_cli.factorize(torch.zeros(5, 7), rank=3)
    assert b.shape == (5, 0) and a.shape == (0, 7)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 2, "energy": 0.9}, "rank and energy both set a rank policy"),
        ({}, "no rank policy; give one of rank, energy, max_error or budget"),
        ({"max_error": 1.5}, "max_error must be in [0, 1)"),
        ({"rank": 2, "method": "magic"}, "method magic is not one of auto, exact, randomized"),
    ],
)
def test_library_errors_speak_of_arguments(kwargs, words):
    with pytest.raises(lowrank_cli.UsageError) as caught:
        lowrank_cli.factorize(torch.ones(4, 4), **kwargs)
    assert words in str(caught.value)
    assert "--" not in str(caught.value)


def test_factorize_refuses_what_is_not_a_float_matrix():
    with pytest.raises(lowrank_cli.UsageError, match="2-D floating-point"):
        lowrank_cli.factorize(torch.ones(2, 3, 4), rank=1)
    with pytest.raises(lowrank_cli.UsageError, match="2-D floating-point"):
        lowrank_cli.factorize(torch.ones(3, 4, dtype=torch.int64), rank=1)
    with pytest.raises(lowrank_cli.TensorError, match="NaN"):
        lowrank_cli.factorize(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), rank=1)


# --- the checkpoint functions are what the CLI runs ----------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {
        "a.weight": low_rank(96, 64, 8, seed=1),
        "b.weight": low_rank(300, 260, 260, seed=2),  # full rank, above the exact-SVD size of auto
        "b.bias": torch.randn(300),
    }
    return save(tmp_path / "m.safetensors", tensors, metadata={"format": "pt"}), tensors


@pytest.mark.parametrize(
    "options",
    [{"rank": 4}, {"energy": 0.9, "method": "randomized", "seed": 7}, {"max_error": 0.2, "dtype": "float16"}],
    ids=str,
)
def test_compress_and_expand_write_what_the_cli_writes(checkpoint, tmp_path, options):
    source, _ = checkpoint
    flags = [x for key, value in options.items() for x in (f"--{key.replace('_', '-')}", value)]
    assert cli("compress", source, "-o", tmp_path / "cli.safetensors", *flags, "--device", "cpu").exit_code == 0
    report = lowrank_cli.compress(source, tmp_path / "api.safetensors", device="cpu", **options)
    assert sha256(tmp_path / "cli.safetensors") == sha256(tmp_path / "api.safetensors")
    assert isinstance(report, lowrank_cli.Report) and report.output == str(tmp_path / "api.safetensors")
    assert cli("expand", tmp_path / "cli.safetensors", "-o", tmp_path / "cli.dense.safetensors").exit_code == 0
    lowrank_cli.expand(tmp_path / "api.safetensors", tmp_path / "api.dense.safetensors")
    assert sha256(tmp_path / "cli.dense.safetensors") == sha256(tmp_path / "api.dense.safetensors")


def test_extract_writes_what_the_cli_writes(tmp_path):
    base = {"l.weight": low_rank(40, 30, 30, seed=1)}
    tuned = {"l.weight": base["l.weight"] + low_rank(40, 30, 3, seed=2)}
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "tuned.safetensors", tuned)
    args = (tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    assert cli("extract", *args, "-o", tmp_path / "cli", "--rank", 3, "--device", "cpu").exit_code == 0
    lowrank_cli.extract(*args, tmp_path / "api", rank=3, device="cpu")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha256(tmp_path / "cli" / name) == sha256(tmp_path / "api" / name), name


def test_analyze_returns_the_cli_json(checkpoint):
    source, _ = checkpoint
    result = cli("analyze", source, "--energy", "0.99", "--json")
    assert result.exit_code == 0
    document = lowrank_cli.analyze(source, energy=0.99).to_dict()
    assert document == json.loads(result.stdout)
    assert document["schema_version"] >= 2
    statuses = {t["status"] for t in document["tensors"]}
    assert statuses <= {s.value for s in lowrank_cli.Status}


def test_progress_reports_every_byte(checkpoint):
    source, _ = checkpoint
    calls = []
    lowrank_cli.analyze(source, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == source.stat().st_size - _header_bytes(source)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def _header_bytes(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# --- every command × method × policy, on full-rank and low-rank input --------------------------------

POLICIES = [["--rank", "6"], ["--energy", "0.95"], ["--max-error", "0.05"], ["--budget", "0.5"]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    made = {}
    for kind, k in (("full", 70), ("low", 5)):
        base = {"w.weight": low_rank(90, 70, 70, seed=11), "v.weight": low_rank(50, 40, 40, seed=12)}
        tuned = {name: w + low_rank(*w.shape, min(k, *w.shape), seed=13) * 0.1 for name, w in base.items()}
        base_path = save(folder / f"{kind}_base.safetensors", base)
        tuned_path = save(folder / f"{kind}_tuned.safetensors", tuned)
        made[kind] = (base_path, tuned_path, base, tuned)
    return made


# analyze has no --method: it runs once per policy
COMBINATIONS = [
    (command, method, policy, kind)
    for command in ("analyze", "compress", "extract")
    for policy in POLICIES
    for method in (["auto"] if command == "analyze" else ["auto", "exact", "randomized"])
    for kind in ("full", "low")
]


def _expected_status(command: str, policy: list[str], matrix: torch.Tensor) -> str:
    """extract keeps every ΔW as a LoRA pair; compress and analyze keep W dense where the policy's rank
    is at or above break-even, r·(m + n) ≥ m·n (--budget 0.5 of two matrices: both factorized)."""
    if command == "extract":
        return "extracted"
    m, n = matrix.shape
    s = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    kept = np.cumsum(s**2) / (s**2).sum()  # kept[r - 1]: the energy share of the first r terms
    rank = {
        "--rank": 6,
        "--energy": int(np.argmax(kept >= 0.95)) + 1,
        "--max-error": int(np.argmax(np.append(0.0, kept) >= 1 - 0.05**2)),
        "--budget": 0,
    }[policy[0]]
    return "dense" if rank * (m + n) >= m * n else "factorized"


@pytest.mark.parametrize(
    ("command", "method", "policy", "kind"), COMBINATIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else x
)
def test_every_combination_ends_in_a_report_that_holds_on_the_files(inputs, tmp_path, command, method, policy, kind):
    base_path, tuned_path, base, tuned = inputs[kind]
    out = tmp_path / "out"
    if command == "analyze":
        result = cli("analyze", tuned_path, *policy, "--json")
    elif command == "compress":
        result = cli("compress", tuned_path, "-o", out, *policy, "--method", method, "--json")
    else:
        result = cli("extract", base_path, tuned_path, "-o", out, *policy, "--method", method, "--json")
    assert_no_crash(result)
    assert result.exit_code == 0, result.stderr
    rows = by_name(json.loads(result.stdout))
    target = {"--max-error": 0.05, "--energy": (1 - 0.95) ** 0.5}.get(policy[0])
    for name in base:
        row = rows[name]
        matrix = tuned[name] - base[name] if command == "extract" else tuned[name]
        assert row["status"] == _expected_status(command, policy, matrix), (name, row)
        if command == "compress" and row["status"] == "factorized":
            written = load(out)
            assert relative_error(matrix, written[f"{name}.B"], written[f"{name}.A"]) == pytest.approx(
                row["rel_error"], rel=1e-5, abs=1e-7
            )
        elif command == "extract" and row["status"] == "extracted":
            written = load(out / "adapter_model.safetensors")
            b, a = (
                written[f"base_model.model.{name[:-7]}.lora_B.weight"],
                written[f"base_model.model.{name[:-7]}.lora_A.weight"],
            )
            assert relative_error(matrix, b, a) == pytest.approx(row["rel_error"], rel=1e-5, abs=1e-7)
        if target is not None and row["status"] in ("factorized", "extracted"):
            assert row["rel_error"] <= target * (1 + 1e-6), (name, row)


def test_extract_full_rank_delta_with_randomized_and_an_error_target(tmp_path):
    """The crash of issue 9: a full-rank ΔW, randomized, --max-error 0.01 gave an AttributeError."""
    base = {"l.weight": low_rank(120, 100, 100, seed=1)}
    tuned = {"l.weight": base["l.weight"] + low_rank(120, 100, 100, seed=2)}
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "tuned.safetensors", tuned)
    result = cli(
        "extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-o", tmp_path / "ad",
        "--method", "randomized", "--max-error", "0.01", "--json",
    )  # fmt: skip
    assert_no_crash(result)
    assert result.exit_code == 0, result.stderr
    row = by_name(json.loads(result.stdout))["l.weight"]
    written = load(tmp_path / "ad" / "adapter_model.safetensors")
    b, a = written["base_model.model.l.lora_B.weight"], written["base_model.model.l.lora_A.weight"]
    delta = tuned["l.weight"] - base["l.weight"]
    assert relative_error(delta, b, a) <= 0.01
    assert row["rank"] == b.shape[1]


# --- optional extras ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feature", "call"),
    [
        ("load_pretrained", lambda folder, small, text, out: lowrank_cli.load_pretrained(folder, weights=small)),
        ("evaluate", lambda folder, small, text, out: lowrank_cli.evaluate(folder, small, text=text)),
        ("heal", lambda folder, small, text, out: lowrank_cli.heal(folder, small, out, text=text)),
        ("calibrate", lambda folder, small, text, out: lowrank_cli.calibrate(folder, out, text=text)),
    ],
)
def test_every_call_that_needs_transformers_names_the_same_extra(tmp_path, monkeypatch, feature, call):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save(folder / "model.safetensors", {"l.weight": low_rank(12, 10, 2, seed=1)})
    small = tmp_path / "small.safetensors"
    lowrank_cli.compress(folder / "model.safetensors", small, rank=2)
    text = tmp_path / "text.txt"
    text.write_text("a sentence to read\nanother one\n")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(lowrank_cli.MissingExtraError) as caught:
        call(folder, small, text, tmp_path / "out.safetensors")
    hint = "needs transformers, which is not installed; pip install 'lowrank[calibrate]'"
    assert str(caught.value) == f"{feature} {hint}"


# --- include and exclude: one glob or a list ----------------------------------------------------------

GLOB_TENSORS = {
    "layer.0.attn.weight": low_rank(24, 16, 4, seed=11),
    "layer.0.mlp.weight": low_rank(20, 16, 4, seed=12),
    "layer.1.attn.weight": low_rank(24, 16, 4, seed=13),
    "layer.1.mlp.weight": low_rank(20, 16, 4, seed=14),
}


@settings(max_examples=20, deadline=None)
@given(
    pattern=st.sampled_from(["*attn*", "layer.1.*", "layer.0.mlp.weight", "*.weight", "layer.?.mlp.*"]),
    option=st.sampled_from(["include", "exclude"]),
)
def test_analyze_reads_a_lone_string_as_one_glob(tmp_path_factory, pattern, option):
    path = save(tmp_path_factory.mktemp("globs") / "m.safetensors", GLOB_TENSORS)
    keep = [n for n in GLOB_TENSORS if fnmatch.fnmatchcase(n, pattern) == (option == "include")]
    if not keep:  # a selection of nothing is refused (check_patterns), a string or not
        return
    report = lowrank_cli.analyze(path, **{option: pattern})
    assert [t.name for t in report.tensors] == keep


def test_every_function_reads_a_lone_string_as_one_glob(tmp_path):
    base = save(tmp_path / "base.safetensors", GLOB_TENSORS)
    tuned = {name: w + low_rank(*w.shape, 2, seed=20 + i) for i, (name, w) in enumerate(GLOB_TENSORS.items())}
    save(tmp_path / "tuned.safetensors", tuned)
    kept = ["layer.0.attn.weight", "layer.1.attn.weight"]

    report = lowrank_cli.compress(base, tmp_path / "c.safetensors", rank=2, include="*attn*")
    assert [t.name for t in report.tensors if t.status == lowrank_cli.Status.factorized] == kept

    report = lowrank_cli.extract(base, tmp_path / "tuned.safetensors", tmp_path / "adapter", rank=2, exclude="*mlp*")
    assert [t.name for t in report.tensors if t.status == lowrank_cli.Status.extracted] == kept

    report = lowrank_cli.resize(tmp_path / "adapter", tmp_path / "r1", rank=1, include="*layer.0*")
    resized = [t.name for t in report.tensors if t.rank == 1]
    assert len(resized) == 1 and "layer.0.attn" in resized[0]


@pytest.mark.parametrize("patterns", [[1], b"*.weight", {"*": 1}, 3])
def test_globs_that_are_not_strings_are_refused_by_name(tmp_path, patterns):
    path = save(tmp_path / "m.safetensors", GLOB_TENSORS)
    with pytest.raises(lowrank_cli.UsageError, match=r"^exclude must be a glob or a list of globs \(str\)"):
        lowrank_cli.analyze(path, exclude=patterns)


# --- docstrings: every argument of the public API, and an example -------------------------------------

ARGUMENT_LINE = re.compile(r"^([A-Za-z_]\w*(?:\s*(?:,|/|and)\s*[A-Za-z_]\w*)*):")


def _documented(doc: str) -> set[str]:
    """The names an `Args:` section describes, one line per argument or per group (`rank, energy:`,
    `rank / energy:`), at the section's first indentation."""
    lines = doc.expandtabs().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return set()
    names, indent = set(), None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth <= len(lines[start]) - len(lines[start].lstrip()):
            break  # Returns:, Example: …
        indent = depth if indent is None else indent
        match = ARGUMENT_LINE.match(line.strip()) if depth == indent else None
        if match:
            names.update(re.split(r"\s*(?:,|/|\band\b)\s*", match.group(1)))
    return names


def _public_callables():
    """Every function in lowrank_cli.__all__, and the constructors (and alternative constructors)
    of its classes that are not plain records (dataclasses, named tuples, enums, errors)."""
    for name in lowrank_cli.__all__:
        value = getattr(lowrank_cli, name)
        if inspect.isfunction(value):
            yield name, value, value
            continue
        records = (Exception, enum.Enum, tuple)
        if not inspect.isclass(value) or issubclass(value, records) or dataclasses.is_dataclass(value):
            continue
        yield name, value.__init__, value  # documented in the class docstring
        for attr, member in vars(value).items():
            if isinstance(member, classmethod) and not attr.startswith("_"):
                yield f"{name}.{attr}", member.__func__, member.__func__


@pytest.mark.parametrize(
    ("name", "function", "documented_on"), list(_public_callables()), ids=[name for name, *_ in _public_callables()]
)
def test_every_public_function_documents_every_argument_and_gives_an_example(name, function, documented_on):
    parameters = [
        p.name
        for p in list(inspect.signature(function).parameters.values())
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    doc = inspect.getdoc(documented_on) or ""
    missing = [p for p in parameters if p not in _documented(doc)]
    assert not missing, f"{name}: its docstring's Args: section does not describe {missing}"
    assert "Example" in doc, f"{name}: its docstring has no example"
