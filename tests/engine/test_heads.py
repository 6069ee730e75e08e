"""Every head (``engine.heads``): what each task seeds on logits of any rank, conservation
(inputs + sinks == seed, per seed and sample) at batch 1 and 2, and planted evidence for
token classification and question answering on tiny models trained here in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine import DLBacktrace
from engine.tasks import TASKS, TaskName
from tests.helpers.tiny import tiny_bert


def assert_conserved(result: dict) -> None:
    c = result["conservation"]
    np.testing.assert_allclose(c["inputs"] + c["sinks"], c["seed"], atol=1e-4, rtol=0)


# ------------------------------------------------------------ logits of any rank


@pytest.mark.parametrize("batch", [1, 2])
def test_text_classification_of_token_logits_explains_the_last_position(batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 2, 4)
    dlb = DLBacktrace(nn.Linear(4, 3), (x,))
    res = dlb.run_task(task="text-classification", inputs=(x,))
    assert_conserved(res)
    np.testing.assert_allclose(res["conservation"]["seed"], np.full(batch, 100.0))
    assert res["predictions"].shape == (batch, 3)
    assert res["position"].tolist() == [1] * batch
    rel = res["relevance"][dlb.captured.input_names[0]]
    assert rel.shape == (batch, 2, 4)
    assert rel[:, 0].abs().max() == 0  # only the explained position's inputs take relevance


def test_image_classification_of_higher_rank_logits_is_a_clear_error():
    x = torch.randn(2, 2, 4)
    dlb = DLBacktrace(nn.Linear(4, 3), (x,))
    with pytest.raises(ValueError, match="token-classification"):
        dlb.run_task(inputs=(x,))  # detected as an image: [B, C] logits or an error


@pytest.mark.parametrize("task", ["text-classification", "image-classification"])
def test_a_position_on_pooled_logits_is_a_clear_error(task):
    """[B, C] logits have no token to pick: the error says to leave position out, not that
    the model should return the [B, C] it does return."""
    x = torch.randn(2, 4)
    dlb = DLBacktrace(nn.Linear(4, 3), (x,))
    with pytest.raises(ValueError, match=r"returns \(2, 3\), one prediction per sample: leave"):
        dlb.run_task(task=task, inputs=(x,), position=1)


def padded(batch: int, length: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 40, (batch, length), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    mask[1:, length - 2 :] = 0  # the second sample is right-padded
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def token_classifier():
    model = tiny_bert("BertForTokenClassification")
    return DLBacktrace(model, padded(2))


@pytest.mark.parametrize("batch", [1, 2])
def test_token_logits_as_text_classification_conserve_per_sample(token_classifier, batch):
    inputs = padded(batch)
    res = token_classifier.run_task(task="text-classification", inputs=inputs)
    assert_conserved(res)
    np.testing.assert_allclose(res["conservation"]["seed"], np.full(batch, 100.0))
    assert res["position"].tolist() == [5, 3][:batch]  # each sample's last real token
    assert res["relevance"]["input_ids"].shape == (batch, 6)


@pytest.mark.parametrize("batch", [1, 2])
def test_token_classification_seeds_every_real_token(token_classifier, batch):
    inputs = padded(batch)
    res = token_classifier.run_task(task="token-classification", inputs=inputs)
    assert_conserved(res)
    assert res["seeds"] == TASKS[TaskName.TOKEN_CLASSIFICATION].seeds
    assert res["relevance"]["input_ids"].shape == (6, batch, 6)  # [K = T, B, T]
    mask = inputs["attention_mask"].T.numpy()  # seed k is token k's
    np.testing.assert_allclose(res["conservation"]["seed"], 100.0 * mask)
    assert res["predicted_labels"].shape == (batch, 6)
    rel = res["relevance"]["input_ids"]
    assert rel[torch.as_tensor(mask == 0)].abs().sum() == 0  # padding: no seed


def test_token_classification_of_one_position_and_label(token_classifier):
    inputs = padded(2)
    res = token_classifier.run_task(
        task="token-classification", inputs=inputs, position=2, target=1
    )
    assert_conserved(res)
    assert res["relevance"]["input_ids"].shape == (2, 6)
    assert res["target"][:, 2].tolist() == [1, 1]
    with pytest.raises(ValueError, match="padding"):
        token_classifier.run_task(task="token-classification", inputs=inputs, position=5)


# ------------------------------------------------------------ transformers heads


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("head", ["TokenClassification", "QuestionAnswering"])
def test_transformers_heads_run_and_conserve(arch, head):
    import transformers

    config = transformers.AutoConfig.for_model(
        arch,
        vocab_size=40,
        hidden_size=16,
        dim=16,
        hidden_dim=32,
        n_layers=1,
        n_heads=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3 if head == "TokenClassification" else 2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"AutoModelFor{head}").from_config(config).eval()
    inputs = padded(2)
    inputs["input_ids"][:, 0] = 3  # no padding id at a real position
    dlb = DLBacktrace(model, inputs)
    task = "token-classification" if head == "TokenClassification" else "question-answering"
    res = dlb.run_task(task=task, inputs=inputs)
    assert_conserved(res)
    seeds = 6 if head == "TokenClassification" else 2
    assert res["relevance"]["input_ids"].shape == (seeds, 2, 6)
    if head == "QuestionAnswering":
        span = res["answer_span"]
        assert res["seeds"] == ("start", "end")
        assert span.shape == (2, 2) and (span[1] < 4).all()  # never on padding
        with torch.no_grad():
            out = model(**inputs)
        assert span[0].tolist() == [
            int(out.start_logits[0].argmax()),
            int(out.end_logits[0].argmax()),
        ]


# ------------------------------------------------------------ planted evidence

VOCAB, LENGTH, MARKER = 20, 12, 2


class ConvTagger(nn.Module):
    """Embedding and a convolution of width 3: position i sees tokens i-1, i and i+1. With
    ``split``, the [B, T, 2] logits are returned as start and end logits, as transformers'
    question-answering heads do."""

    def __init__(self, labels: int, split: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, labels)
        self.split = split

    def forward(self, input_ids):
        h = torch.relu(self.conv(self.embed(input_ids).transpose(1, 2))).transpose(1, 2)
        logits = self.head(h)
        if not self.split:
            return logits
        start, end = logits.split(1, dim=-1)
        return start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()


def fit(model: nn.Module, ids: torch.Tensor, loss_of, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        i = torch.randint(0, len(ids), (64,), generator=torch.Generator().manual_seed(step))
        loss = loss_of(model(ids[i]), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def marked_words(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random words with a few markers; the label of position i is 1 iff token i-1 is the
    marker."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
    ids[torch.rand(n, LENGTH, generator=g) < 0.15] = MARKER
    labels = torch.zeros(n, LENGTH, dtype=torch.long)
    labels[:, 1:] = (ids[:, :-1] == MARKER).long()
    return ids, labels


def test_token_classification_finds_the_marker_before_each_tagged_token():
    ids, labels = marked_words(3000, seed=1)
    model = ConvTagger(2)
    fit(model, ids, lambda out, i: nn.functional.cross_entropy(out.transpose(1, 2), labels[i]))
    test_ids, test_labels = marked_words(100, seed=2)
    with torch.no_grad():
        assert (model(test_ids).argmax(-1) == test_labels).float().mean() > 0.98
    dlb = DLBacktrace(model, (test_ids[:2],))
    res = dlb.run_task(task="token-classification", inputs=(test_ids,), relevance_nodes="inputs")
    assert_conserved(res)
    rel = res["relevance"]["input_ids"]  # [T, B, T]: relevance of each token's label
    k, b = torch.nonzero(torch.as_tensor(test_labels.T == 1), as_tuple=True)
    hits = (rel[k, b].argmax(-1) == k - 1).float().mean()
    assert len(k) > 50 and hits >= 0.9, hits


def answer_spans(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random words; the answer (two or three words) starts right after the open marker and
    ends right before the close marker (token MARKER + 1), out of the start's sight."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    start = torch.randint(1, LENGTH - 4, (n,), generator=g)
    end = start + torch.randint(1, 3, (n,), generator=g)
    rows = torch.arange(n)
    ids[rows, start - 1] = MARKER
    ids[rows, end + 1] = MARKER + 1
    return ids, torch.stack([start, end], -1)


def test_question_answering_finds_the_markers_around_the_answer():
    ids, spans = answer_spans(3000, seed=1)
    model = ConvTagger(2, split=True)

    def loss_of(out, i):
        return sum(nn.functional.cross_entropy(o, spans[i, k]) for k, o in enumerate(out))

    fit(model, ids, loss_of)
    test_ids, test_spans = answer_spans(100, seed=2)
    dlb = DLBacktrace(model, (test_ids[:2],))
    res = dlb.run_task(task="question-answering", inputs=(test_ids,), relevance_nodes="inputs")
    assert_conserved(res)
    assert (torch.as_tensor(res["answer_span"]) == test_spans).all(1).float().mean() > 0.95
    rel = res["relevance"]["input_ids"]  # [2, B, T]: the start's, then the end's
    start_hits = (rel[0].argmax(-1) == test_spans[:, 0] - 1).float().mean()
    end_hits = (rel[1].argmax(-1) == test_spans[:, 1] + 1).float().mean()
    assert start_hits >= 0.9 and end_hits >= 0.9, (start_hits, end_hits)


def test_question_answering_refuses_contrast():
    """Start and end logits are not alternatives of one another: contrast is refused before
    any work, naming the mode and the task."""
    dlb = DLBacktrace(tiny_bert("BertForQuestionAnswering", num_labels=2), padded(2))
    with pytest.raises(ValueError, match='mode "contrast" is not defined for question-answering'):
        dlb.run_task(task="question-answering", inputs=padded(2), mode="contrast")


@pytest.mark.parametrize(
    "cls,task,seeds",
    [("BertForTokenClassification", "token-classification", 6),
     ("BertForQuestionAnswering", "question-answering", 2)],
)  # fmt: skip
def test_evaluation_ranks_each_samples_tokens_per_seed(cls, task, seeds):
    """Relevance [K, B, T] is ranked per seed and sample: the indices were into [B * T],
    rows of one seed of both samples flattened together (index 8 in a text of 6 tokens)."""
    x = padded(2)
    model = tiny_bert(cls, num_labels=3 if task == "token-classification" else 2)
    dlb = DLBacktrace(model, x)
    res = dlb.run_task(task=task, inputs=x, relevance_nodes="inputs")
    top = dlb.evaluation(res, top_k=3)["top_features"]["input_ids"]
    assert top["index"].shape == top["value"].shape == (seeds, 2, 3)
    expected = torch.as_tensor(res["relevance"]["input_ids"]).topk(3, dim=-1)
    np.testing.assert_array_equal(top["index"], expected.indices.numpy())


def test_a_threshold_warns_that_token_labels_are_decided_by_argmax():
    """Each token's label is its argmax: thresholding=0.3 changed nothing, without a word
    (as a classifier of several logits already says)."""
    x = padded(2)
    dlb = DLBacktrace(tiny_bert("BertForTokenClassification"), x)
    with pytest.warns(UserWarning, match="thresholding=0.3 has no effect") as caught:
        dlb.run_task(task="token-classification", inputs=x, thresholding=0.3)
    assert caught[0].filename == __file__  # at the caller of run_task


def test_image_classification_of_token_ids_names_the_task_that_fits():
    """It ran, as a text classifier reported under the wrong task."""
    x = padded(2)
    dlb = DLBacktrace(tiny_bert("BertForSequenceClassification"), x)
    with pytest.raises(ValueError, match=r"explains images.*task='text-classification'"):
        dlb.run_task(task="image-classification", inputs=x)
