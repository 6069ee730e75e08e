"""Pairs of texts (``inputs.text_pair``) in the worker: ``tokenizer(text, text_pair)`` with the
tokenizer's ``token_type_ids``, which reach a BERT as its second segment, through the graph
the engine captures; zeros for raw token ids, so that every batch of the model runs through
one graph; refused for a task or a tokenizer that has no pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast, GPT2TokenizerFast

from engine.tasks import TaskName
from service.models import CachedModel, LoadedModel
from service.registry import ModelSpec
from service.schemas import Inputs
from service.work import inputs
from tests.helpers.models import VOCAB
from tests.helpers.tiny import tiny_bert

QUESTION, CONTEXT = "who lives in paris", "tom lives in paris"


def _qa(task: TaskName = TaskName.QUESTION_ANSWERING, tok=None) -> tuple[CachedModel, ModelSpec]:
    tok = tok or BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    loaded = LoadedModel("qa", task, tiny_bert("BertForQuestionAnswering", 2), tok)
    spec = ModelSpec.model_validate(
        {
            "id": "qa",
            "task": task.value,
            "source": {"kind": "transformers", "path": "qa"},
            "limits": {"max_tokens": 16},
        }
    )
    return CachedModel(loaded, "r", "cpu", "float32", 0, 0.0), spec


def test_a_pair_reaches_the_model_as_two_segments() -> None:
    """The answer's logits are those of a plain forward of ``tokenizer(q, c)`` with its
    token_type_ids (without them the context's differ); the captured graph takes them, and
    the relevance of start and end, which adds up with the sinks to the seed, reaches the
    tokens of both texts."""
    entry, spec = _qa()
    tok, model = entry.loaded.tokenizer, entry.loaded.model
    batch = inputs.tokens(entry, spec, Inputs(text=QUESTION, text_pair=CONTEXT))
    plain = tok(QUESTION, CONTEXT, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    for name, value in plain.items():
        torch.testing.assert_close(batch[name], value)
    segment = batch["token_type_ids"][0].bool().numpy()
    assert segment.sum() == len(CONTEXT.split()) + 1  # the context and its [SEP]

    dlb = entry.backtrace(batch)
    assert "token_type_ids" in dlb.captured.input_names
    res = dlb.run_task(task=TaskName.QUESTION_ANSWERING, inputs=batch)
    with torch.no_grad():
        out = model(**plain)
        flat = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"])
    logits = torch.stack([out.start_logits, out.end_logits], -1)
    np.testing.assert_allclose(res["predictions"], logits.numpy(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(flat.start_logits[0, segment], out.start_logits[0, segment])
    np.testing.assert_array_equal(res["answer_span"][0], logits[0].argmax(0).numpy())

    c = res["conservation"]
    np.testing.assert_allclose(c["inputs"] + c["sinks"], c["seed"], rtol=1e-4)
    relevance = res["relevance"]["input_ids"][:, 0].abs().numpy()  # [start/end, tokens]
    assert (relevance[:, ~segment].sum(1) > 0).all() and (relevance[:, segment].sum(1) > 0).all()


def test_raw_ids_and_merged_pairs_keep_one_graph() -> None:
    """Raw ids get segment 0 where the model takes segments, and jobs merged into one batch
    keep each one's segments (padding: segment 0), so every batch has the inputs of the
    graph captured first."""
    entry, spec = _qa()
    ids = inputs.tokens(entry, spec, Inputs(token_ids=[2, 15, 3]))
    torch.testing.assert_close(ids["token_type_ids"], torch.zeros(1, 3, dtype=torch.long))
    pair = inputs.tokens(entry, spec, Inputs(text=[QUESTION], text_pair=["tom"]))
    merged, rows = inputs.merge(entry, [ids, pair])
    assert set(merged) == set(pair) and merged["token_type_ids"].shape == (2, 8)
    torch.testing.assert_close(merged["token_type_ids"][rows[1]], pair["token_type_ids"])
    assert not merged["token_type_ids"][rows[0]].any()


def test_pairs_refused_where_they_mean_nothing() -> None:
    """Generation continues one prompt; a tokenizer that puts nothing between the texts
    (GPT-2's) would run them together: both are the job's error, as the door says them."""
    entry, spec = _qa(TaskName.GENERATION)
    with pytest.raises(ValueError, match="inputs.text_pair: generation takes one text per input"):
        inputs.tokens(entry, spec, Inputs(text=QUESTION, text_pair=CONTEXT))
    gpt2 = GPT2TokenizerFast(
        vocab={w: i for i, w in enumerate(VOCAB)}, merges=[], unk_token="[UNK]"
    )
    entry, spec = _qa(tok=gpt2)
    with pytest.raises(ValueError, match="the tokenizer of qa puts no separator"):
        inputs.tokens(entry, spec, Inputs(text=QUESTION, text_pair=CONTEXT))


def test_results_mark_the_second_text_only_for_pairs() -> None:
    """A result's ``segments`` say which text each real token is from, for pairs only."""
    from service.work.documents import _segments

    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    pair = {"token_type_ids": torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])}
    assert _segments(pair, 0, mask.bool()) == {"segments": [0, 0, 1, 1]}
    assert _segments(pair, 1, mask.bool()) == {}  # one text: nothing to tell apart
    assert _segments({}, 0, mask.bool()) == {}
