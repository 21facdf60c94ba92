"""evaluate by model kind: sentence-transformers pooling modes, task heads, encoder-decoders, masked-LM masks.

Tiny models are built from configs as in test_evaluate; each figure is recomputed in the test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure, cli
from test_evaluate import compressed, dense_model, encoded, line_text, tiny_folder

import lowrank_cli

transformers = pytest.importorskip("transformers")


# --- pooling ----------------------------------------------------------------------------------------


def pooled_folder(tmp_path: Path, config: dict) -> Path:
    """The tiny encoder as a sentence-transformers folder whose Pooling module has `config`."""
    folder = tiny_folder(tmp_path, "encoder")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **config}))
    return folder


@pytest.mark.parametrize(
    ("config", "mode"),
    [
        (
            {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True},
            "lasttoken",
        ),
        ({"pooling_mode_weightedmean_tokens": True, "pooling_mode_mean_tokens": False}, "weightedmean"),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len"),
        ({"pooling_mode_cls_token": True}, "cls"),
        ({"pooling_mode_max_tokens": True}, "max"),
        ({"pooling_mode_mean_tokens": False}, "mean"),  # none set: sentence-transformers pools by mean
        ({"pooling_mode": "lasttoken"}, "lasttoken"),  # sentence-transformers 5 and newer
        ({"pooling_mode": "mean_sqrt_len_tokens"}, "mean_sqrt_len"),
        ({"pooling_mode": ["cls"]}, "cls"),
    ],
)
def test_each_pooling_key_is_read_as_its_mode(tmp_path, config, mode):
    from lowrank_cli.model.evaluate import read_pooling

    assert read_pooling(pooled_folder(tmp_path, config)) == mode


@pytest.mark.parametrize(
    "config",
    [
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},  # concatenated: not one embedding
        {"pooling_mode": ["cls", "max"]},
        {"pooling_mode": "splade"},
        {"pooling_mode_attention_tokens": True},
    ],
)
def test_a_pooling_evaluate_cannot_compute_is_refused(tmp_path, config):
    folder = pooled_folder(tmp_path, config)
    result = cli("evaluate", folder, folder, "--text", line_text(tmp_path / "t.txt"))
    assert_clean_failure(result, 1, "1_Pooling", "pools by")


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"])
def test_pool_is_sentence_transformers_pooling(mode):
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    from lowrank_cli.model.evaluate import POOLING_MODES, pool

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 8, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1] * length + [0] * (7 - length) for length in (7, 3, 1, 5)])  # right padding
    expected = Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})
    torch.testing.assert_close(pool(hidden, mask, POOLING_MODES[mode]), expected["sentence_embedding"])


@torch.no_grad()
def test_last_token_pooling_is_measured_on_the_last_tokens(tmp_path):
    folder = pooled_folder(tmp_path, {"pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True})
    candidate = compressed(folder, tmp_path)
    text = line_text(tmp_path / "eval.txt")
    result = lowrank_cli.evaluate(folder, candidate, text=text)
    tuned, reference = dense_model(folder, candidate, tmp_path)
    cosines = []
    for ids in encoded(folder, text):
        x = torch.tensor([ids])
        a, b = reference(input_ids=x).last_hidden_state[0, -1].double(), tuned(input_ids=x).last_hidden_state[0, -1]
        cosines.append(float(torch.nn.functional.cosine_similarity(a, b.double(), dim=0)))
    assert result.pooling == "lasttoken" and "lasttoken pooling" in result.metric
    assert result.cosine_mean == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)


# --- task heads and encoder-decoders ----------------------------------------------------------------


def head_folder(tmp_path: Path, model_class: str, **config) -> Path:
    """A tiny BERT with a task head (transformers' class `model_class`), saved with its tokenizer."""
    from test_evaluate import WORDS, _tokenizer

    folder = tmp_path / model_class
    torch.manual_seed(0)
    settings = dict(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64,
    )  # fmt: skip
    model = getattr(transformers, model_class)(transformers.BertConfig(**{**settings, **config}))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
    model.eval().save_pretrained(folder)
    _tokenizer(folder, tmp_path)
    return folder


@torch.no_grad()
@pytest.mark.parametrize("head", ["BertForSequenceClassification", "BertForTokenClassification"])
def test_a_classifier_heads_class_distributions_are_compared(tmp_path, head):
    folder = head_folder(tmp_path, head, num_labels=3)
    candidate = compressed(folder, tmp_path, rank=3)
    text = line_text(tmp_path / "eval.txt")
    result = lowrank_cli.evaluate(folder, candidate, text=text)
    tuned, reference = dense_model(folder, candidate, tmp_path)
    kl = agree = count = 0.0
    for ids in encoded(folder, text):  # one sample at a time: no padding
        x = torch.tensor([ids])
        p = torch.log_softmax(reference(input_ids=x).logits[0].double(), -1)  # (labels,) or (tokens, labels)
        q = torch.log_softmax(tuned(input_ids=x).logits[0].double(), -1)
        p, q = p.reshape(-1, 3), q.reshape(-1, 3)
        kl += float((p.exp() * (p - q)).sum())
        agree += float((p.argmax(-1) == q.argmax(-1)).sum())
        count += len(p)
    kind = "sequence-classifier" if "Sequence" in head else "token-classifier"
    assert result.kind == kind and result.positions == count
    assert result.kl_mean == pytest.approx(kl / count, rel=1e-4) and result.kl_mean > 1e-4
    assert result.fidelity == pytest.approx(math.exp(-kl / count), rel=1e-4)
    assert result.top1_agreement == pytest.approx(agree / count, abs=1.5 / count)
    assert result.perplexity_reference is None and result.cosine_mean is None
    table = cli("evaluate", folder, candidate, "--text", text)
    assert table.exit_code == 0, table.output
    assert f"{result.fidelity:.4f}" in table.stdout and "perplexity" not in table.stdout


@pytest.mark.parametrize(
    ("head", "config", "words"),
    [
        ("BertForSequenceClassification", {"num_labels": 1}, ["BertForSequenceClassification", "regression"]),
        (
            "BertForSequenceClassification",
            {"num_labels": 3, "problem_type": "multi_label_classification"},
            ["multi_label_classification"],
        ),
        ("BertForQuestionAnswering", {}, ["BertForQuestionAnswering", "cannot compare"]),
    ],
)
def test_a_head_whose_outputs_are_no_class_distribution_is_refused_by_name(tmp_path, head, config, words):
    folder = head_folder(tmp_path, head, **config)
    result = cli("evaluate", folder, folder, "--text", line_text(tmp_path / "t.txt"))
    assert_clean_failure(result, 1, *words)


def test_an_encoder_decoder_is_refused_by_name(tmp_path):
    from test_evaluate import WORDS, _tokenizer

    folder = tmp_path / "t5"
    config = transformers.T5Config(
        vocab_size=len(WORDS) + 5, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    _tokenizer(folder, tmp_path)
    result = cli("evaluate", folder, folder, "--text", line_text(tmp_path / "t.txt"))
    assert_clean_failure(result, 1, "T5ForConditionalGeneration", "encoder-decoder")


def test_heal_lowers_a_sequence_classifiers_kl(tmp_path):
    folder = head_folder(tmp_path, "BertForSequenceClassification", num_labels=3)
    candidate = compressed(folder, tmp_path, rank=2)
    train, held = line_text(tmp_path / "train.txt", lines=200, seed=3), line_text(tmp_path / "eval.txt", seed=5)
    out = tmp_path / "healed"
    report = lowrank_cli.heal(folder, candidate, out, text=train, eval_text=held, epochs=4, lr=3e-3)
    assert report.options["heal"]["loss"] == "KL per sample"
    before = lowrank_cli.evaluate(folder, candidate, text=held).kl_mean
    after = lowrank_cli.evaluate(folder, out, text=held).kl_mean
    assert after < 0.8 * before, (before, after)


# --- masked-LM masks --------------------------------------------------------------------------------


def _masked_samples(evaluator) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each sample's (original ids, masked positions), read off the evaluator's batches, in a fixed order."""
    found = []
    for masked, mask, where, original in evaluator.batches:
        for row in range(len(masked)):
            real = int(mask[row].sum())
            assert not mask[row, real:].any()  # right padding
            positions = tuple(where[row, :real].nonzero().flatten().tolist())
            assert (masked[row][where[row]] != original[row][where[row]]).all() or not positions
            found.append((tuple(original[row, :real].tolist()), positions))
    return sorted(found)


@pytest.mark.parametrize("split", ["lines", "windows"])
def test_masked_positions_do_not_depend_on_the_batching(tmp_path, split):
    from lowrank_cli.model.evaluate import make_evaluator, model_samples
    from lowrank_cli.ops.hfmodel import load_model

    folder = tiny_folder(tmp_path, "masked-lm")
    text = line_text(tmp_path / "eval.txt", lines=120)
    reference, tokenizer = load_model(folder, "cpu", "evaluate")
    found = model_samples(reference, tokenizer, folder, text, seq_len=16, split=split)
    masks = [
        _masked_samples(make_evaluator(reference, tokenizer, found, folder, batch_size=size, device="cpu"))
        for size in (1, 7, 16)
    ]
    assert masks[0] == masks[1] == masks[2]
    if split == "windows":  # batches of one shape: each sample has its own draw, not one mask per shape
        evaluator = make_evaluator(reference, tokenizer, found, folder, batch_size=7, device="cpu")
        first, second = evaluator.batches[0][2], evaluator.batches[1][2]
        assert first.shape == second.shape and not torch.equal(first, second)
    candidate = compressed(folder, tmp_path)
    one, seven = (
        lowrank_cli.evaluate(folder, candidate, text=text, split=split, seq_len=16, batch_size=b) for b in (1, 7)
    )
    assert one.positions == seven.positions
    assert one.fidelity == pytest.approx(seven.fidelity, rel=1e-5)


# --- loading the reference ----------------------------------------------------------------------------


def test_the_reference_loads_in_its_checkpoints_dtype_whatever_transformers_defaults_to(tmp_path, monkeypatch):
    # transformers 4 loaded float32 by default and 5 loads the checkpoint's dtype: "auto" says which
    from lowrank_cli.ops.hfmodel import load_model

    folder = tiny_folder(tmp_path, "causal-lm", dtype=torch.bfloat16)
    seen = []
    real = transformers.LlamaForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("dtype"))
        kwargs["dtype"] = kwargs.get("dtype") or torch.float32  # what an older transformers did without it
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(spy))
    model, _ = load_model(folder, "cpu", "evaluate")
    assert seen == ["auto"] and {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_an_older_transformers_is_refused_with_the_extra_to_install(tmp_path, monkeypatch):
    import sys

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    folder = tiny_folder(tmp_path, "encoder")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.3")  # the module imports give now
    result = cli("evaluate", folder, folder, "--text", line_text(tmp_path / "t.txt"))
    assert_clean_failure(result, 1, "transformers 5", "4.46.3", "lowrank[calibrate]")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    for extra in ("calibrate", "sentence-transformers", "test"):
        (pin,) = [r for r in project["project"]["optional-dependencies"][extra] if r.startswith("transformers")]
        assert pin == "transformers>=5"
