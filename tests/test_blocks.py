"""The block runner (lowrank_cli.model.blocks): a model run one block at a time gives the whole model's outputs.

Tiny models of each kind of block (Llama with grouped-query attention, sharded; Qwen2 and Gemma3
with sliding-window layers; GPT-2's Conv1D; BERT's encoder, with and without its masked-LM head)
are saved with random weights; the reference for every figure is the model's own forward in
transformers, each block's output caught by a hook on the whole model's layer. Batches carry
padding, so masks are the model's own. The real model is SmolLM2-135M-Instruct (the `smollm2`
fixture), skipped where it is not installed.
"""

from __future__ import annotations

import gc
import json
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load
from safetensors import safe_open

from lowrank_cli.errors import CheckpointError
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.model.blocks import BlockRunner
from lowrank_cli.nn import LowRankEmbedding, LowRankLinear

transformers = pytest.importorskip("transformers")

EPS32 = float(np.finfo(np.float32).eps)
VOCAB = 300
LENGTHS = (12, 8, 5)  # one batch, right-padded: the mask is part of what each block is called with


def _config(kind: str):
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4)
    if kind == "llama-gqa":
        return transformers.LlamaConfig(**small, num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "qwen2":  # layers from max_window_layers on attend within a sliding window of 4 tokens
        return transformers.Qwen2Config(
            **small, num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
            max_window_layers=1, tie_word_embeddings=False,
        )  # fmt: skip
    if kind == "gemma3":  # sliding and full attention layers, each with its own rotary table and mask
        return transformers.Gemma3TextConfig(
            **small, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=30.0,
        )  # fmt: skip
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    return transformers.BertConfig(**small, num_hidden_layers=3, max_position_embeddings=64)


MODELS = {
    # kind: (model class, where its blocks are, its embedding's name in the file)
    "llama-gqa": ("LlamaForCausalLM", "model.layers", "model.embed_tokens.weight"),
    "qwen2": ("Qwen2ForCausalLM", "model.layers", "model.embed_tokens.weight"),
    "gemma3": ("Gemma3ForCausalLM", "model.layers", "model.embed_tokens.weight"),
    "gpt2": ("GPT2LMHeadModel", "transformer.h", "transformer.wte.weight"),
    "bert-mlm": ("BertForMaskedLM", "bert.encoder.layer", "bert.embeddings.word_embeddings.weight"),
    "bert": ("BertModel", "encoder.layer", "embeddings.word_embeddings.weight"),
}


def tiny_model(tmp_path: Path, kind: str, shard: str | None = None) -> tuple[torch.nn.Module, Path]:
    """(the model, its folder): random weights of a visible scale, saved as safetensors (sharded if `shard`)."""
    torch.manual_seed(0)
    model = getattr(transformers, MODELS[kind][0])(_config(kind)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.15)
            else:  # norms and biases away from their 1 / 0 initialization
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
    folder = tmp_path / kind
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    return model, folder


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=generator)
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def whole_model(model: torch.nn.Module, blocks_name: str, ids, mask) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each block's output, the model's output) from transformers' own forward of the whole model."""
    outputs: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _module, _args, out: outputs.append(out))
        for block in model.get_submodule(blocks_name)
    ]
    try:
        with torch.no_grad():
            output = model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, output.logits if hasattr(output, "logits") else output.last_hidden_state


def assert_float32_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding: the same operations in the same order, scaled by the largest value."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=64 * EPS32 * max(scale, 1.0))


@pytest.mark.parametrize("kind", list(MODELS))
def test_block_by_block_gives_every_block_output_and_the_logits_of_the_whole_model(tmp_path, kind):
    model, folder = tiny_model(tmp_path, kind, shard="40KB" if kind == "llama-gqa" else None)
    if kind == "llama-gqa":
        assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
    blocks_name = MODELS[kind][1]
    ids, mask = padded_batch()
    expected_blocks, expected = whole_model(model, blocks_name, ids, mask)

    with BlockRunner(folder) as runner:
        assert runner.blocks_name == blocks_name
        assert len(runner) == len(expected_blocks)
        hidden = runner.embed(ids, mask)
        with torch.no_grad():
            for block, reference in zip(runner.blocks(), expected_blocks, strict=True):
                hidden = runner.run_block(block, hidden)
                assert hidden.states.dtype == torch.float32
                assert_float32_close(hidden.states, reference)
            assert_float32_close(runner.head(hidden), expected)
            # a head that acts on each position alone, in chunks of positions: the same numbers
            chunks = [runner.head(hidden, slice(start, start + 5)) for start in range(0, max(LENGTHS), 5)]
            assert_float32_close(torch.cat(chunks, dim=1), expected)


def test_gemma3_sliding_layers_are_run_with_their_own_window(tmp_path):
    """The window matters on this batch (a model with a window as long as the text computes other logits),
    so the runner's equality with the whole model (above) holds only if each layer gets its own mask."""
    model, folder = tiny_model(tmp_path, "gemma3")
    ids, mask = padded_batch()
    _, windowed = whole_model(model, "model.layers", ids, mask)
    model.config.sliding_window = max(LENGTHS)
    _, unwindowed = whole_model(model, "model.layers", ids, mask)
    assert float((windowed - unwindowed).abs().max()) > 1e-3

    with BlockRunner(folder) as runner:
        calls = runner.embed(ids, mask).calls
    sliding, full = calls[0].kwargs, calls[1].kwargs
    assert sliding["position_embeddings"] is calls[2].kwargs["position_embeddings"]
    assert sliding["position_embeddings"] is not full["position_embeddings"]
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2", "bert-mlm"])
def test_a_tied_embedding_is_one_tensor_read_once(tmp_path, kind, monkeypatch):
    _, folder = tiny_model(tmp_path, kind)
    embedding = MODELS[kind][2]
    stored = {name for path in folder.glob("*.safetensors") for name in load(path)}
    assert embedding in stored and len([n for n in stored if n.endswith("word_embeddings.weight")]) <= 1
    reads: Counter[str] = Counter()
    for method in ("mapped", "read"):
        original = getattr(Checkpoint, method)

        def counted(self, name, _original=original):
            reads[name] += 1
            return _original(self, name)

        monkeypatch.setattr(Checkpoint, method, counted)

    ids, mask = padded_batch()
    with BlockRunner(folder) as runner:
        hidden = runner.embed(ids, mask)
        with torch.no_grad():
            for block in runner.blocks():
                hidden = runner.run_block(block, hidden)
            runner.head(hidden)
            runner.head(hidden)
        head = runner.model.get_output_embeddings().weight
        assert head is runner.model.get_input_embeddings().weight
        assert not head.is_meta
    assert reads[embedding] == 1
    assert max(reads.values()) == 1  # every tensor of the file read once


def test_one_block_is_in_memory_at_a_time_and_is_freed_when_the_loop_moves_on(tmp_path):
    _, folder = tiny_model(tmp_path, "llama-gqa")
    ids, mask = padded_batch()
    with BlockRunner(folder) as runner:
        stack = runner.model.model.layers
        hidden = runner.embed(ids, mask)
        freed = []
        with torch.no_grad():
            for block in runner.blocks():
                loaded = [i for i, layer in enumerate(stack) if any(not p.is_meta for p in layer.parameters())]
                assert loaded == [block.index]
                assert stack[block.index] is block.module
                assert block.name == f"model.layers.{block.index}"
                with pytest.raises(RuntimeError, match=f"block {block.index} is still in hand"):
                    runner.load_block(0).__enter__()
                hidden = runner.run_block(block, hidden)
                freed.append(weakref.ref(block.module))
                del block
        gc.collect()
        assert all(ref() is None for ref in freed)
        assert all(p.is_meta for p in stack.parameters())


def test_blocks_of_a_lowrank_file_run_as_factors(tmp_path):
    """A compressed folder runs block by block with its factors (never a dense weight), as load_pretrained runs it."""
    import lowrank_cli
    from lowrank_cli.nn import load_pretrained

    _, folder = tiny_model(tmp_path, "llama-gqa")
    compressed = tmp_path / "llama.lowrank"
    lowrank_cli.compress(folder, compressed, rank=8)  # every matrix, the tied embedding too
    reference = load_pretrained(compressed)
    ids, mask = padded_batch()
    expected_blocks, expected = whole_model(reference, "model.layers", ids, mask)

    with BlockRunner(compressed) as runner:
        embedding, head = runner.model.model.embed_tokens, runner.model.lm_head
        assert isinstance(embedding, LowRankEmbedding) and isinstance(head, LowRankLinear)
        assert head.B is embedding.B and head.A is embedding.A  # the tied head shares the factors
        hidden = runner.embed(ids, mask)
        with torch.no_grad():
            for block, reference_block in zip(runner.blocks(), expected_blocks, strict=True):
                assert isinstance(block.module.self_attn.q_proj, LowRankLinear)
                assert block.module.self_attn.q_proj.rank == 8
                hidden = runner.run_block(block, hidden)
                assert_float32_close(hidden.states, reference_block)
            assert_float32_close(runner.head(hidden), expected)

    # the original folder's config with the compressed weights beside it: the same model
    with BlockRunner(folder, weights=compressed) as runner:
        hidden = runner.embed(ids, mask)
        with torch.no_grad():
            for block in runner.blocks():
                assert isinstance(block.module.mlp.down_proj, LowRankLinear)
                hidden = runner.run_block(block, hidden)
            assert_float32_close(runner.head(hidden), expected)


def test_compute_dtype_and_the_file_dtype_differ(tmp_path):
    """A float32 file run in float64: every tensor converted as it loads; the figures are the float64 model's."""
    model, folder = tiny_model(tmp_path, "qwen2")
    ids, mask = padded_batch()
    _, expected = whole_model(model.to(torch.float64), "model.layers", ids, mask)
    with BlockRunner(folder, dtype=torch.float64) as runner:
        hidden = runner.embed(ids, mask)
        assert hidden.states.dtype == torch.float64
        with torch.no_grad():
            for block in runner.blocks():
                assert all(p.dtype == torch.float64 for p in block.module.parameters())
                hidden = runner.run_block(block, hidden)
            logits = runner.head(hidden)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


def test_a_file_without_a_blocks_tensor_is_refused_naming_it(tmp_path):
    _, folder = tiny_model(tmp_path, "llama-gqa")
    path = folder / "model.safetensors"
    tensors = load(path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    tensors["extra.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    ids, mask = padded_batch()
    with BlockRunner(folder) as runner:
        assert runner.unexpected_keys == ["extra.weight"]
        hidden = runner.embed(ids, mask)
        blocks = runner.blocks()
        with torch.no_grad():
            hidden = runner.run_block(next(blocks), hidden)  # block 0 is whole
            with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight'"):
                next(blocks)


def test_an_encoder_decoder_is_refused_by_name(tmp_path):
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, decoder_start_token_id=0
    )
    folder = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    with pytest.raises(CheckpointError, match="encoder-decoder"):
        BlockRunner(folder)


def test_smollm2_block_by_block_gives_the_whole_models_logits(smollm2):
    """The real model: a bfloat16 folder with a tied head, run in float32 block by block, against
    transformers' float32 forward of the whole model, on a padded batch of real text."""
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as handle:
        dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    assert set(dtypes.values()) == {"BF16"}
    assert "model.embed_tokens.weight" in dtypes and "lm_head.weight" not in dtypes  # the tied head: one tensor
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    lines = [
        "The block runner loads one decoder layer at a time from the safetensors file.",
        "Low-rank factors keep the largest singular values.",
        "Each sample runs through every layer in turn.",
    ]
    encoded = tokenizer(lines, padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1]  # padding in the batch
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    _, expected = whole_model(model, "model.layers", ids, mask)
    del model
    with BlockRunner(smollm2) as runner:
        assert len(runner) == config["num_hidden_layers"]
        hidden = runner.embed(ids, mask)
        with torch.no_grad():
            for block in runner.blocks():
                hidden = runner.run_block(block, hidden)
            logits = runner.head(hidden)
        assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    assert_float32_close(logits, expected)


def _resident_file_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident set from /proc")
def test_released_block_pages_leave_the_resident_set_and_read_back_the_same(tmp_path):
    """Checkpoint.release drops the mapped pages a block touched (the runner calls it on freeing the block);
    a tensor mapped again reads the file's values afresh, and a neighbour's pages are kept."""
    from safetensors.torch import save_file

    from lowrank_cli.io.checkpoint import open_checkpoint

    rng = np.random.default_rng(7)
    big = torch.from_numpy(rng.standard_normal((2048, 4096)).astype(np.float32))  # 32 MiB
    small = torch.arange(10, dtype=torch.float32)
    save_file({"model.layers.0.w": big, "model.norm.weight": small}, str(tmp_path / "m.safetensors"))
    with open_checkpoint(tmp_path / "m.safetensors") as checkpoint:
        kept = checkpoint.mapped("model.norm.weight")
        mapped = checkpoint.mapped("model.layers.0.w")
        assert float(mapped.sum(dtype=torch.float64)) == pytest.approx(float(big.sum(dtype=torch.float64)))
        before = _resident_file_kb()
        del mapped
        checkpoint.release(["model.layers.0.w"])
        dropped = before - _resident_file_kb()
        assert dropped > 0.9 * big.numel() * 4 / 1024  # KB: the tensor's pages (less a partial page at each end)
        assert torch.equal(checkpoint.mapped("model.layers.0.w"), big)
        assert torch.equal(kept, small)
