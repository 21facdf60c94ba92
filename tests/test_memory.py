"""A loaded model maps its file: what a forward never touches is never read, and the file may go.

Memory is the peak RSS of child processes (VmHWM, reset after the imports and a warm-up
forward), never a timing. The model is a BERT whose word-embedding table dominates the file, as
in all-MiniLM-L6-v2, while a forward reads one row of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import cli_json  # noqa: E402

from lowrank_cli.nn import load_pretrained  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 40_000, 128  # a 20 MiB float32 table beside an encoder of 0.2 MiB
TOKENS = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from transformers import BertConfig, BertModel
from lowrank_cli.nn import load_pretrained
torch.set_num_threads(1)

def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

tiny = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
with torch.inference_mode():  # the kernels' code is paged in before the measure, for both loaders alike
    BertModel(tiny).eval()(torch.zeros(1, 16, dtype=torch.long))
with open("/proc/self/clear_refs", "w") as reset:
    reset.write("5")  # VmHWM := VmRSS
before = kib("VmRSS")
model = load_pretrained(sys.argv[2]) if sys.argv[1] == "factored" else BertModel.from_pretrained(sys.argv[2]).eval()
with torch.inference_mode():
    model(torch.zeros(1, 16, dtype=torch.long))
print(json.dumps(kib("VmHWM") - before))
"""


def _encoder_compressed(tmp_path) -> tuple[Path, Path]:
    """A BERT saved dense, and beside it its encoder compressed at rank 8 (the embeddings kept whole)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=40,
    )
    source = tmp_path / "dense"
    transformers.BertModel(config).eval().save_pretrained(source)
    out = tmp_path / "small"
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    cli_json(
        "compress",
        source / "model.safetensors",
        "--rank",
        "8",
        "--include",
        "encoder.*",
        "-o",
        out / "model.safetensors",
    )
    return source, out


def _added_mib(mode: str, folder: Path) -> float:
    code = CHILD.format(root=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code, mode, str(folder)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1]) / 1024


def test_a_forward_reads_only_the_rows_of_the_table_it_uses(tmp_path):
    source, out = _encoder_compressed(tmp_path)
    table_mib = VOCAB * HIDDEN * 4 / 2**20
    factored, dense = _added_mib("factored", out), _added_mib("dense", source)
    # Read whole, the table alone would add 19.5 MiB; mapped, a 16-token forward maps a few pages of it
    # (at most a 2 MiB folio of the page cache per touched row).
    assert factored < table_mib / 4, (factored, table_mib)
    assert factored <= dense + 2, (factored, dense)  # no more than transformers' own loader, like for like


HEAL_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM
from lowrank_cli.model.heal import HealOptions, train, trainable
from lowrank_cli.nn import load_pretrained
from lowrank_cli.ops.samples import Split, TextSamples
torch.set_num_threads(1)

def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

reference = LlamaForCausalLM.from_pretrained(sys.argv[1]).eval()
model = load_pretrained(sys.argv[2], LlamaForCausalLM, dtype=torch.float32)
names = set()
for path in Path(sys.argv[2]).glob("*.safetensors"):
    with safe_open(str(path), framework="pt") as handle:
        names |= set(handle.keys())
layers = trainable(model, names)
def run(batch, seq):
    ids = torch.randint(3, reference.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    samples = TextSamples(ids.tolist(), Split.windows, "")
    train(reference, model, layers, samples, HealOptions(steps=1, batch_size=batch), pad=0, device="cpu")
run(1, 8)  # kernels and the optimizer's code paged in before the measure
with open("/proc/self/clear_refs", "w") as reset:
    reset.write("5")  # VmHWM := VmRSS
before = kib("VmRSS")
run({batch}, {seq})
print(json.dumps(kib("VmHWM") - before))
"""


def test_a_heal_step_keeps_few_vocabulary_wide_tensors(tmp_path):
    # A causal LM whose logits dominate a training step: batch × seq × vocab floats, beside a model of
    # a few MiB. KL written as P·(log P − log Q) kept the logits, log Q, P and their temporaries at once.
    batch, seq, vocab = 8, 128, 32_000
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=seq,
    )  # fmt: skip
    source = tmp_path / "dense"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(source)
    out = tmp_path / "small"
    cli_json("compress", source, "--rank", "4", "--include", "model.layers.*", "-o", out)
    code = HEAL_CHILD.format(root=str(ROOT), batch=batch, seq=seq)
    run = subprocess.run(
        [sys.executable, "-c", code, str(source), str(out)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    copies = json.loads(run.stdout.splitlines()[-1]) * 1024 / (batch * seq * vocab * 4)
    assert copies < 5, copies  # measured: 4.0 (P, log Q and backward's temporaries); 8.0 as P·(log P − log Q)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_loaded_model_survives_its_file_replaced_or_deleted_and_never_writes_to_it(tmp_path):
    _, out = _encoder_compressed(tmp_path)
    file = out / "model.safetensors"
    model = load_pretrained(out)
    with torch.no_grad():
        expected = model(TOKENS).last_hidden_state.clone()
    digest = _digest(file)
    with torch.no_grad():  # training in place writes to the tensors, never through to the file
        for parameter in model.parameters():
            parameter.mul_(2)
    assert _digest(file) == digest
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.div_(2)  # exact: a power of two

    replacement = tmp_path / "other.safetensors"
    replacement.write_bytes(b"\0" * file.stat().st_size)
    os.replace(replacement, file)  # how lowrank's writers publish: a new inode under the old name
    with torch.no_grad():
        assert torch.equal(model(TOKENS).last_hidden_state, expected)
    file.unlink()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).last_hidden_state, expected)


def test_a_dtype_change_converts_a_copy_and_leaves_the_values(tmp_path):
    _, out = _encoder_compressed(tmp_path)
    mapped, converted = load_pretrained(out), load_pretrained(out, dtype=torch.float64)
    for (name, kept), (_, wide) in zip(mapped.named_parameters(), converted.named_parameters(), strict=True):
        assert kept.dtype == torch.float32 and wide.dtype == torch.float64, name
        assert torch.equal(wide, kept.double()), name
        assert wide.is_contiguous(), name
