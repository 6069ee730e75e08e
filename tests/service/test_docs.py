"""The API documents itself offline: /docs and /redoc load Swagger UI's and ReDoc's files
from the API (the fastapi-offline package), never from a CDN; every route lists its error
replies with their body; the icon is served; static files are counted under their route;
heatmaps carry their colour scale. In process, without Redis (none of this needs it), but for
/models."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import heatmap
from service.api import create_app
from service.config import Settings

ASSET = re.compile(r"""(?:src|href|spec-url)="([^"]+)"|url: '([^']+)'""")


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    yield TestClient(create_app(Settings(redis_url="redis://127.0.0.1:1/0")))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_only_local_assets(api: TestClient, page: str) -> None:
    html = api.get(page)
    assert html.status_code == 200
    urls = [a or b for a, b in ASSET.findall(html.text)]
    assert len(urls) >= 3, urls  # the script, the icon, the OpenAPI document
    assert "http://" not in html.text and "https://" not in html.text
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        assert api.get(url).status_code == 200, url


def test_every_route_lists_its_errors(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    expected = {
        ("post", "/run_task"): {"404", "409", "413", "422", "429", "503"},
        ("get", "/jobs/{job_id}"): {"404", "503"},
        ("delete", "/jobs/{job_id}"): {"404", "409", "503"},
        ("get", "/jobs/{job_id}/heatmap.png"): {"404", "503"},
        ("get", "/jobs/{job_id}/events"): {"400", "404", "503"},
        ("get", "/models"): {"401", "503"},
        ("get", "/readyz"): {"503"},
    }
    for (method, path), codes in expected.items():
        responses = paths[path][method]["responses"]
        assert codes <= set(responses), (path, sorted(responses))
        for code in codes:
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema["$ref"].startswith("#/components/schemas/"), (path, code)
    text = str(paths)
    for internal in ("GIL", "p50", "thread pool"):
        assert internal not in text


def test_icon_and_static_route_label(api: TestClient) -> None:
    icon = api.get("/favicon.ico")
    assert icon.status_code == 200 and icon.content[:4] == b"\0\0\1\0"
    assert api.get("/static/app.js").status_code == 200
    metrics = api.get("/metrics").text
    assert 'route="/static/{path}",status="200"' in metrics
    assert 'route="/favicon.ico",status="200"' in metrics
    assert 'route="unmatched",status="200"' not in metrics


def test_text_heatmap_has_a_colour_scale() -> None:
    """Relevance all positive still shows the whole scale, blue (-max) to red (+max)."""
    png = heatmap.token_grid([np.array([1.0, 0.5]), np.array([0.2, 0.1])], ["a", "b"], ["x", "y"])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)
    blue = (pixels[:, 2] > 200) & (pixels[:, 0] < 60)
    red = (pixels[:, 0] > 200) & (pixels[:, 2] < 60)
    assert blue.any() and red.any()


@pytest.mark.parametrize("word", ["café", "Жизнь", "straße"])
def test_heatmap_labels_draw_letters_beyond_ascii(word: str) -> None:
    """A token's label is drawn with its letters: Pillow's own font has no accented letters
    or Cyrillic and drew them as the box of a missing glyph (``heatmap.label_font``)."""

    def drawn(label: str) -> np.ndarray:
        png = heatmap.token_grid([np.ones(1)], [label], ["x"])
        return np.asarray(Image.open(io.BytesIO(png)).convert("L"))

    box = drawn("\U0010ffff")  # no font has a glyph for it: a missing glyph's box
    for letter in set(word) - set("abcdefghijklmnopqrstuvwxyz"):
        assert not np.array_equal(drawn(letter), box), letter


def test_models_say_what_they_expect(redis_url: str) -> None:
    """/models carries each registry entry's ``expects`` (the page shows it). It reads the
    workers and their load failures from Redis: a real one here."""
    with TestClient(create_app(Settings(redis_url=redis_url))) as api:
        models = {m["id"]: m for m in api.get("/models").json()["models"]}
    assert "white ink on black" in models["digits-cnn"]["expects"]


@pytest.mark.parametrize(
    "item",
    [
        {"seeds": ["token"], "labels": ["O", "B-PER", "O"]},  # every token's label
        {"seeds": ["token"], "labels": ["O", "B-PER", "O"], "position": 1},  # one token's
        {"seeds": ["start", "end"], "answer_span": [1, 2], "answer_tokens": ["who", "?"]},
    ],
)
def test_token_task_heatmap_has_a_row_per_seed(item: dict) -> None:
    """Token classification and question answering give [seeds, tokens] per text: the
    heatmap has one row of cells per seed (a token's label, the answer's start and end)."""
    from service import codec
    from service.api.render import heatmap_png

    tokens = ["[CLS]", "who", "?"]
    seeds = 1 if "position" in item else len(item.get("labels") or item["seeds"])
    relevance = codec.encode(np.linspace(-1, 1, seeds * 3).reshape(seeds, 3))
    result = {
        "inputs": [{"token_ids": [101, 2, 3], "tokens": tokens, **item, "relevance": relevance}]
    }
    img = Image.open(io.BytesIO(heatmap_png(result)))
    one_row = Image.open(io.BytesIO(heatmap.token_grid([np.ones(3)], tokens, ["x"])))
    assert img.height - one_row.height == 18 * (seeds - 1)  # a cell is 18 pixels high
