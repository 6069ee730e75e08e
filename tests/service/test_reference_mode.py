"""Mode "reference" through the service: the zero reference and the named ones."""

from __future__ import annotations

import httpx
import numpy as np

from tests.helpers.inputs import digit_b64
from tests.helpers.jobs import submit, wait


def test_reference_mode(client: httpx.Client) -> None:
    """Mode "reference" through the service: signed relevance of the change from a zero
    input, conserved like the other modes."""
    body = {
        "model": "digits-cnn",
        "inputs": {"image": digit_b64(5)},
        "relevance": {"mode": "reference"},
        "output": {"encoding": "json"},
    }
    res = wait(client, submit(client, body)["job_id"])["result"]
    assert res["receipt"]["parameters"]["mode"] == "reference"
    c = res["conservation"]
    assert np.allclose(np.add(c["inputs"], c["sinks"]), c["seed"], rtol=1e-3, atol=1e-3)
    rel = np.asarray(res["inputs"][0]["relevance"]["values"])
    assert rel.shape == (1, 16, 16) and np.abs(rel).sum() > 0


def test_named_references(client: httpx.Client) -> None:
    """A named reference changes the explanation and is in the receipt (modes reference and
    contrast); one that does not fit the model's inputs, or comes with another mode, is a 422
    that names the field."""

    def run(model: str, inputs: dict, reference: str | None, mode: str = "reference") -> dict:
        rel = {"mode": mode, **({"reference": reference} if reference else {})}
        body = {"model": model, "inputs": inputs, "relevance": rel, "output": {"encoding": "json"}}
        view = wait(client, submit(client, body)["job_id"])
        assert view["status"] == "finished", view
        return view["result"]

    image = {"image": digit_b64(3)}
    zeros, blur = run("digits-cnn", image, None), run("digits-cnn", image, "blur")
    assert zeros["receipt"]["parameters"]["reference"] == "zeros"
    assert blur["receipt"]["parameters"]["reference"] == "blur"
    values = [np.asarray(r["inputs"][0]["relevance"]["values"]) for r in (zeros, blur)]
    assert not np.allclose(*values)
    text = {"text": "a wonderful, moving film"}
    mask, plain = run("minilm-sentiment", text, "mask"), run("minilm-sentiment", text, None)
    values = [np.asarray(r["inputs"][0]["relevance"]["values"]) for r in (mask, plain)]
    assert values[0].shape == values[1].shape and not np.allclose(*values)
    # contrast explains the change from the same references
    contrast = run("minilm-sentiment", text, "mask", mode="contrast")
    assert contrast["receipt"]["parameters"]["reference"] == "mask"

    bad = [
        ("digits-cnn", image, {"mode": "reference", "reference": "mask"}, "takes reference"),
        ("minilm-sentiment", text, {"reference": "mask"}, 'for modes "reference" and "contrast"'),
        ("digits-cnn", image, {"mode": "reference", "reference": "noise"}, "Input should be"),
    ]
    for model, inputs, rel, message in bad:
        resp = client.post("/run_task", json={"model": model, "inputs": inputs, "relevance": rel})
        assert resp.status_code == 422, resp.text
        error = resp.json()["detail"][0]
        assert message in error["message"] and error["loc"][-1] == "reference", error
