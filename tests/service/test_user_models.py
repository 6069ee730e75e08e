"""Operators' own checkpoints (``save_pretrained`` folders, tests/helpers/user_models.py)
registered as people write entries (id, task, path: no limits, no image block) and served
by a real API and worker on a private Redis. Each request either works, with the answer
the model gives outside the service, or is a 422 at submit naming the field, the value and
what is allowed; never a job that fails in the worker on a Python internal.

What failed before: a text longer than a small model's positions (the registry's default
max_tokens is 128) failed in the worker after the queue; a ViT got 224 x 224 pixels, mean
0 and std 1 whatever its config and image processor said (a 32 x 32 ViT failed every job in
torch.export); a tokenizer without a pad token (a Llama's) failed every job; transparent
pixels read as the black stored under them."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.client import Client
from tests.helpers import user_models
from tests.helpers.stack import ROOT, private_stack


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return user_models.build(tmp_path_factory.mktemp("user-models"))


@pytest.fixture(scope="module")
def api(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    tmp = tmp_path_factory.mktemp("user-stack")
    with private_stack(tmp, user_models.entries(models)) as st:
        client = Client(st.url)
        client.wait_ready(timeout=300, processes=[st.worker])
        yield client


def _refusal(api: Client, body: dict) -> str:
    resp = api.http.post("/run_task", json=body)
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    return error["message"]


def _png(img: Image.Image) -> str:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _picture(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("model", ["user-distilbert", "user-roberta"])
def test_text_past_the_models_positions_is_refused_at_submit(api: Client, model: str) -> None:
    bound = f"more than the {user_models.POSITIONS} positions of {model} (its config.json)"
    text = {"model": model, "inputs": {"text": " ".join(["cat"] * 40)}}
    assert _refusal(api, text).startswith("inputs.text: ")
    assert _refusal(api, text).endswith(f" tokens, {bound}")
    ids = {"model": model, "inputs": {"token_ids": [5] * (user_models.POSITIONS + 1)}}
    assert _refusal(api, ids) == f"inputs.token_ids: {user_models.POSITIONS + 1} tokens, {bound}"


def test_roberta_takes_every_one_of_its_positions(api: Client) -> None:
    """Its table has two rows more than it takes (positions start after the padding id)."""
    ids = [0, *[5] * (user_models.POSITIONS - 2), 2]
    result = api.run({"model": "user-roberta", "inputs": {"token_ids": ids}}, timeout=300)
    assert len(result["predictions"]) == 1


def _transformers_says(code: str, folder: Path, arg: str) -> list[float]:
    """What ``code`` prints last as JSON, run outside the service in a fresh Python (this
    process does not import torch) with the checkpoint ``folder`` and ``arg`` as argv."""
    cmd = [sys.executable, "-c", code, str(folder), arg]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.splitlines()[-1])


def _reference_logits(models: Path, png: str) -> list[float]:
    """The ViT's logits for the picture as transformers' own image processor prepares it."""
    code = (
        "import sys, base64, io, json, torch; from PIL import Image; import transformers as tf; "
        "d = sys.argv[1]; m = tf.ViTForImageClassification.from_pretrained(d).eval(); "
        "p = tf.AutoImageProcessor.from_pretrained(d); "
        "img = Image.open(io.BytesIO(base64.b64decode(sys.argv[2]))); "
        "x = p(images=img, return_tensors='pt')['pixel_values']; "
        "print(json.dumps(m(pixel_values=x).logits[0].tolist()))"
    )
    return _transformers_says(code, models / "vit", png)


def test_a_vit_reads_pictures_as_its_image_processor_does(api: Client, models: Path) -> None:
    png = _png(Image.fromarray(_picture(user_models.VIT_SIZE)))
    result = api.run({"model": "user-vit", "inputs": {"image": png}}, timeout=300)
    logits = result["predictions"][0]["logits"]
    assert np.allclose(logits, _reference_logits(models, png), atol=1e-4), logits


def test_a_one_channel_vit_takes_a_colour_picture(api: Client) -> None:
    png = _png(Image.fromarray(_picture(40)))
    result = api.run({"model": "user-vit-gray", "inputs": {"image": png}}, timeout=300)
    assert result["predictions"][0]["label"] in ("LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3")


def test_transparent_pixels_read_as_the_white_a_page_shows(api: Client) -> None:
    rgb = _picture(user_models.VIT_SIZE)
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    alpha[:, : user_models.VIT_SIZE // 2] = 0  # the left half transparent, black under it
    rgb_under = rgb.copy()
    rgb_under[alpha == 0] = 0
    rgba = Image.fromarray(np.dstack([rgb_under, alpha]), "RGBA")
    on_white = rgb.copy()
    on_white[alpha == 0] = 255
    logits = [
        api.run({"model": "user-vit", "inputs": {"image": _png(img)}}, timeout=300)["predictions"][
            0
        ]["logits"]
        for img in (rgba, Image.fromarray(on_white))
    ]
    assert np.allclose(*logits, atol=1e-5), logits


def _sigmoid(x: list[float]) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x)))


def test_a_multi_label_classifier_reports_each_label_present(api: Client) -> None:
    """Each label scored by its own sigmoid and present at the threshold (they were a
    softmax, decided by argmax); the threshold is honoured."""
    body = {"model": "user-distilbert-multilabel", "inputs": {"text": "the cat sat"}}
    (row,) = api.run(body, timeout=300)["predictions"]
    scores = _sigmoid(row["logits"])
    assert np.allclose(list(row["scores"].values()), scores, atol=1e-6)
    names = ["toxic", "insult", "threat"]
    assert row["labels"] == [n for n, p in zip(names, scores, strict=True) if p >= 0.5]
    assert row["label"] == names[int(np.argmax(scores))]
    everything = {**body, "relevance": {"thresholding": 0.0}}
    assert api.run(everything, timeout=300)["predictions"][0]["labels"] == names


def test_what_a_head_has_no_meaning_for_is_refused_at_submit(api: Client) -> None:
    """A label of a multi-label head is contrasted with its absence, and a regression's value
    with nothing: both 422s naming the field (the worker refused them after the queue)."""
    multi = {"model": "user-distilbert-multilabel", "inputs": {"text": "the cat"}}
    contrast = {"mode": "contrast", "contrast_with": "insult"}
    message = _refusal(api, {**multi, "relevance": contrast})
    assert message.startswith("relevance.contrast_with: user-distilbert-multilabel decides each")
    regression = {"model": "user-distilbert-regression", "inputs": {"text": "the cat"}}
    message = _refusal(api, {**regression, "relevance": {"mode": "contrast"}})
    assert message.startswith("relevance.mode: contrast: user-distilbert-regression is a regr")
    contrast_alone = {**multi, "relevance": {"mode": "contrast"}}
    result = api.run(contrast_alone, timeout=300)
    assert abs(abs(result["conservation"]["seed"][0]) - 100) < 1e-3


def test_a_regression_reports_its_value(api: Client) -> None:
    """The value the model returns, not a probability of it; its relevance adds up."""
    body = {"model": "user-distilbert-regression", "inputs": {"text": "a dog ran"}}
    result = api.run(body, timeout=300)
    (row,) = result["predictions"]
    assert "score" not in row and row["value"] == row["logits"][0] == row["values"]["stars"]
    assert result["summary"]["values"] == [row["value"]]
    c = result["conservation"]
    assert abs(c["inputs"][0] + c["sinks"][0] - c["seed"][0]) < 1e-3


def test_a_checkpoint_without_its_head_warns_on_every_result(api: Client) -> None:
    """A bare encoder registered as a classifier: transformers starts the classifier at
    random, and each result says its predictions are noise (they passed for trained)."""
    body = {"model": "user-distilbert-base", "inputs": {"text": "the cat sat"}}
    result = api.run(body, timeout=300)
    (warning,) = result["warnings"]
    assert warning.startswith("user-distilbert-base: its checkpoint has no trained weights")
    assert "classifier.weight" in warning and "noise" in warning
    assert result["summary"]["warnings"] == [warning]
    assert "warnings" not in api.run({**body, "model": "user-distilbert"}, timeout=300)


def _lm_logits(folder: Path, auto_class: str, text: str, at: str) -> list[float]:
    """A language model's logits at one token of ``text`` as transformers runs it (class
    ``auto_class``; ``at``: the token's index, an expression of the tokenizer ``t`` and the
    inputs ``x``)."""
    code = (
        "import sys, json, torch; import transformers as tf; d = sys.argv[1]; "
        f"m = tf.{auto_class}.from_pretrained(d).eval(); "
        "t = tf.AutoTokenizer.from_pretrained(d); x = t(sys.argv[2], return_tensors='pt'); "
        f"print(json.dumps(m(**x).logits[0, {at}].tolist()))"
    )
    return _transformers_says(code, folder, text)


def test_a_masked_lm_fills_in_its_mask_token(api: Client, models: Path) -> None:
    """head masked-lm: the prediction is the token the model puts at [MASK] (its logits
    there, as transformers gives them; named by the vocabulary), a text without the mask is
    a 422, and a token id is a class to explain."""
    text = "the cat [MASK] on the mat"
    body = {"model": "user-distilbert-mlm", "inputs": {"text": text}}
    result = api.run(body, timeout=300)
    (row,) = result["predictions"]
    mask = "(x['input_ids'][0] == t.mask_token_id).nonzero()[0, 0]"  # its mask token's
    expected = _lm_logits(models / "distilbert-mlm", "AutoModelForMaskedLM", text, mask)
    assert np.allclose(row["logits"], expected, atol=1e-4)
    assert row["index"] == int(np.argmax(expected)) and row["label"] in row["scores"]
    assert len(result["inputs"][0]["tokens"]) == 8
    message = _refusal(api, {**body, "inputs": {"text": "the cat sat"}})
    assert message.startswith("inputs.text: has no [MASK]: user-distilbert-mlm is a masked LM")
    explained = api.run({**body, "relevance": {"target": 7}}, timeout=300)
    assert explained["predictions"][0]["index"] == row["index"]


def test_a_causal_lm_classifies_by_the_token_it_reads_next(api: Client, models: Path) -> None:
    """head causal-lm for text-classification: the prediction is the token the model reads
    after the text (its logits there, as transformers gives them), named by the vocabulary,
    and a token of it names a contrast's alternative. Every job failed at the first
    capture, on labels the entry never gave: its config's default two (LABEL_0, LABEL_1)
    were taken for its classes ("labels has 2 names, but the model has V classes")."""
    text = "the cat sat on the"
    body = {"model": "user-llama-next-token", "inputs": {"text": text}}
    result = api.run(body, timeout=300)
    (row,) = result["predictions"]
    expected = _lm_logits(models / "llama", "AutoModelForCausalLM", text, "-1")
    assert np.allclose(row["logits"], expected, atol=1e-4)
    assert row["index"] == int(np.argmax(expected)) and row["label"] in row["scores"]
    contrast = {"mode": "contrast", "contrast_with": "Ġcat"}
    explained = api.run({**body, "relevance": contrast}, timeout=300)
    assert explained["predictions"][0]["index"] == row["index"]
    assert _refusal(api, {**body, "relevance": {**contrast, "contrast_with": "LABEL_0"}}) == (
        "relevance.contrast_with: 'LABEL_0' is not a token of user-llama-next-token (a causal "
        "LM: its classes are the tokens of its vocabulary): runner-up, rest, a token id (0 to "
        f"{len(expected) - 1}) or one token as its tokenizer writes it; its tokenizer reads "
        "'LABEL_0' as 'L', 'A', 'B', 'E', 'L', '_', '0'"
    )


def test_a_batchs_heatmap_labels_each_text_with_its_own_pieces(
    api: Client, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each text of a classified batch carries the text each of its tokens adds (``text``:
    ' cat' for 'Ġcat', an emoji on the last of its bytes), which joins to the decoded
    text, and the heatmap labels each row's cells with its own text's pieces. Every row
    was drawn under the first text's token strings (mojibake for an emoji's bytes)."""
    from tokenizers import Tokenizer

    from service.api import render

    texts = ["😀 the cat sat", "a dog"]
    body = {"model": "user-llama-next-token", "inputs": {"text": texts}}
    result = api.run(body, timeout=300)
    tok = Tokenizer.from_file(str(models / "llama" / "tokenizer.json"))
    for item in result["inputs"]:
        assert "".join(item["text"]) == tok.decode(item["token_ids"], skip_special_tokens=False)
    assert "😀" in result["inputs"][0]["text"] and " cat" in result["inputs"][0]["text"]
    drawn: dict[str, Any] = {}
    monkeypatch.setattr(render.heatmap, "text_rows", lambda *a: drawn.update(args=a) or b"")
    render.heatmap_png(result)
    _, cells, _ = drawn["args"]
    assert [len(c) for c in cells] == [len(it["token_ids"]) for it in result["inputs"]]
    assert " dog" in cells[1] and " cat" in cells[0]


def test_a_position_in_a_batch_explains_the_token_it_explains_alone(api: Client) -> None:
    """Jobs of one position queued together run as one batch (dynamic batching), and each
    gets the result it gets alone. A tokenizer that pads on the left moved a shorter
    input's tokens right when it was merged with a longer one, so that its position
    picked another token: another prediction and relevance than alone."""
    texts = ["the cat sat on the", "the cat sat on the mat in the park"]
    bodies = [
        {"model": "user-llama-left", "task": "text-classification", "inputs": {"text": t},
         "relevance": {"position": 2}, "output": {"encoding": "json", "dtype": "float32"}}
        for t in texts
    ]  # fmt: skip
    alone = [api.run(b, timeout=300) for b in bodies]
    hold = {"model": "user-llama", "inputs": {"text": "the cat"},
            "generation": {"max_new_tokens": 60, "path": "stepwise"}}  # fmt: skip
    blocker = api.submit(hold)["job_id"]
    while api.job(blocker)["status"] != "started":
        time.sleep(0.02)
    ids = [api.submit(b)["job_id"] for b in bodies]
    api.cancel(blocker)
    batched = [api.wait(j, timeout=300)["result"] for j in ids]
    assert [b["timings"]["batch"]["jobs"] for b in batched] == [2, 2]
    for one, together in zip(alone, batched, strict=True):
        assert together["predictions"][0]["index"] == one["predictions"][0]["index"]
        (a,), (b,) = one["inputs"], together["inputs"]
        assert np.allclose(b["relevance"]["values"], a["relevance"]["values"], rtol=1e-3, atol=1e-3)


def test_a_tokenizer_without_a_pad_token_generates(api: Client) -> None:
    """One prompt, and two of unequal length in one job, each row as it is alone."""
    texts = ["the cat sat on the mat", "a dog"]
    body = {"model": "user-llama", "generation": {"max_new_tokens": 3}}
    alone = [api.run({**body, "inputs": {"text": t}})["generation"]["new_tokens"][0] for t in texts]
    together = api.run({**body, "inputs": {"text": texts}})["generation"]["new_tokens"]
    assert together == alone
    assert all(len(tokens) == 3 for tokens in alone)


def test_generation_settings_out_of_range_name_the_field(api: Client) -> None:
    prompt = {"model": "user-llama", "inputs": {"token_ids": [1] * 60}}
    assert _refusal(api, {**prompt, "generation": {"max_new_tokens": 10}}) == (
        "generation.max_new_tokens: 10 after a 60-token prompt is more than the model's 64 "
        "positions: at most 4"
    )
    # a prompt that fills the positions is the prompt's fault, new tokens sent or not (it was
    # refused on max_new_tokens, "at most 0")
    assert _refusal(
        api, {**prompt, "inputs": {"token_ids": [1] * 64}, "generation": {"max_new_tokens": 1}}
    ) == (
        "inputs.token_ids: a 64-token prompt fills the model's 64 positions: none is left for "
        "a generated token; send at most 63 tokens"
    )
    assert _refusal(api, {**prompt, "inputs": {"token_ids": [1, 999]}}).startswith(
        "inputs.token_ids: id 999 is not a token id (0 to "
    )


def _t5_generates(models: Path, texts: list[str], steps: int) -> list[list[int]]:
    """The T5's greedy tokens for ``texts`` outside the service, its source padded as its
    tokenizer pads."""
    code = (
        "import sys, json, transformers as tf; d = sys.argv[1]; "
        "m = tf.AutoModelForSeq2SeqLM.from_pretrained(d).eval(); "
        "t = tf.AutoTokenizer.from_pretrained(d); "
        "x = t(json.loads(sys.argv[2]), return_tensors='pt', padding=True); "
        "out = m.generate(**x, max_new_tokens=int(sys.argv[3]), do_sample=False); "
        "print(json.dumps(out[:, 1:].tolist()))"
    )
    cmd = [sys.executable, "-c", code, str(models / "t5"), json.dumps(texts), str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.splitlines()[-1])


def test_an_encoder_decoder_generates_and_explains_each_token(api: Client, models: Path) -> None:
    """A T5 registered with task generation and no head (its config.json says
    encoder-decoder) generates the tokens it generates outside the service, and each step's
    relevance lies on the source, the decoder's start token and the tokens before it, laid
    out as a causal LM's prompt and previous tokens (conserved: it sums to the step's
    ``inputs``). Before, the worker loaded it as a causal LM and every job failed."""
    texts = ["the cat sat on the mat", "a dog"]
    body = {"model": "user-t5", "inputs": {"text": texts}, "generation": {"max_new_tokens": 3}}
    g = api.run({**body, "output": {"encoding": "json"}}, timeout=300)["generation"]
    assert g["new_token_ids"] == _t5_generates(models, texts, 3)
    prompt = g["prompt_tokens"][0]
    assert prompt[-1] == "<pad>"  # the decoder's start, after the source
    assert len(g["relevance_trace"]) == len(g["new_token_ids"][0])
    for step, (trace, c) in enumerate(
        zip(g["relevance_trace"], g["conservation_trace"], strict=True)
    ):
        rel = np.asarray(trace["values"])
        assert rel.shape == (2, len(prompt) + step)
        assert np.allclose(rel.sum(1), c["inputs"], rtol=1e-3, atol=1e-3)
        assert np.abs(rel[:, : len(prompt) - 1]).sum() > 0  # the source explains something
