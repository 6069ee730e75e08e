"""The page at ``/`` in a real browser, against the real API and worker: streamed generation
with selectable tokens, an image with its heatmap overlay, a text label with shaded tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.helpers.browser import screenshot
from tests.helpers.stack import Stack

# Records, in the page, how many generated tokens were shown at each change of #sequence and
# when the status first said "Finished": proof that tokens arrive one event at a time.
TIMELINE = """() => {
  window.timeline = {counts: [], firstToken: null, finished: null};
  new MutationObserver(() => {
    const n = document.querySelectorAll('#sequence button.generated').length;
    const t = window.timeline;
    if (n && n !== t.counts.at(-1)) t.counts.push(n);
    if (n && t.firstToken === null) t.firstToken = performance.now();
  }).observe(document.getElementById('sequence'), {childList: true});
  const status = document.getElementById('status');
  new MutationObserver(() => {
    const t = window.timeline;
    if (t.finished === null && status.textContent.startsWith('Finished'))
      t.finished = performance.now();
  }).observe(status, {childList: true, characterData: true, subtree: true});
}"""

PROMPT_SHADING = """() => [...document.querySelectorAll('#sequence .token.prompt')].map(
  el => ({text: el.textContent, bg: el.style.backgroundColor,
          rel: el.dataset.relevance === undefined ? null : Number(el.dataset.relevance)}))"""


def test_static_assets_are_served(stack: Stack) -> None:
    index = httpx.get(f"{stack.url}/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    for asset in ("app.js", "render.js", "style.css"):
        resp = httpx.get(f"{stack.url}/static/{asset}")
        assert resp.status_code == 200 and resp.content, asset
        assert "http://" not in resp.text and "https://" not in resp.text, "no remote assets"


def test_generation_streams_and_selected_token_changes_shading(page: Any) -> None:
    page.select_option("#model", "tiny-lookup-lm")
    page.fill("#text", "a3 c1 f9 h0 ? c")
    page.fill("#max-new-tokens", "4")
    page.select_option("#path", "stepwise")
    page.evaluate(TIMELINE)
    page.click("#run")
    page.wait_for_selector("#sequence button.generated")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Finished')")
    timeline = page.evaluate("window.timeline")
    assert timeline["counts"] == list(range(1, timeline["counts"][-1] + 1)), timeline
    assert timeline["counts"][-1] >= 2 and timeline["firstToken"] < timeline["finished"]

    assert "seed" in page.text_content("#conservation"), "the selected step's conservation"
    latest = page.locator("#sequence button.generated").last
    assert latest.get_attribute("aria-pressed") == "true", "the latest token is selected"
    before = page.evaluate(PROMPT_SHADING)
    # each token's piece is what it adds to the decoded text (its leading space drawn as
    # "·"; the decoder writes "h0?" without one)
    assert [t["text"] for t in before] == ["a3", "·c1", "·f9", "·h0", "?", "·c"]
    assert all(t["rel"] is not None for t in before), before

    first = page.locator("#sequence button.generated").first
    first.click()
    assert first.get_attribute("aria-pressed") == "true"
    assert latest.get_attribute("aria-pressed") == "false"
    after = page.evaluate(PROMPT_SHADING)
    assert [t["bg"] for t in after] != [t["bg"] for t in before], "shading follows the token"
    strongest = max(after, key=lambda t: t["rel"])
    assert strongest["text"] == "·c1", "the answer to '? c' comes from the pair 'c1'"
    assert page.text_content("#selected-info").startswith("Relevance for generated token 1")

    page.keyboard.press("ArrowRight")  # keyboard focus selects too
    second = page.locator("#sequence button.generated").nth(1)
    assert second.get_attribute("aria-pressed") == "true"
    assert page.evaluate("document.activeElement.dataset.step") == "1"
    assert page.is_visible("#report") and "seed" in page.text_content("#conservation")

    page.click("#matrix-view summary")
    rows = page.locator("#matrix tbody tr")
    assert rows.count() == 6 + timeline["counts"][-1] - 1  # prompt + earlier generated tokens
    assert page.locator("#matrix td[data-relevance]").count() > 6
    page.locator("#sequence button.generated").first.focus()
    screenshot(page, "generation")


def test_image_overlay_is_drawn(page: Any, tmp_path: Path) -> None:
    from service.demo.digits import sample_png

    digit = tmp_path / "digit.png"
    digit.write_bytes(sample_png(3))
    page.select_option("#model", "digits-cnn")
    assert page.is_hidden("#text") and page.is_visible("#image")
    page.set_input_files("#image", str(digit))
    page.click("#run")
    page.wait_for_selector("#image-view", state="visible")
    assert page.text_content("#image-label").startswith("Predicted: ")
    tinted = """() => {
      const c = document.getElementById('overlay');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let tinted = 0, lit = 0;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i] + d[i + 1] + d[i + 2] > 0) lit++;
        if (Math.abs(d[i] - d[i + 2]) > 30) tinted++;  // grey image: colour is the overlay
      }
      return {tinted, lit};
    }"""
    drawn = page.evaluate(tinted)
    assert drawn["lit"] > 0 and drawn["tinted"] > 0, drawn
    page.focus("#opacity")
    page.keyboard.press("Home")  # opacity 0: the picture alone, no tint
    assert page.evaluate(tinted)["tinted"] == 0
    page.keyboard.press("End")
    assert page.evaluate(tinted)["tinted"] >= drawn["tinted"]
    screenshot(page, "image")


def test_a_results_warnings_are_shown(page: Any, tmp_path: Path) -> None:
    """A blank page: the result warns that the prediction means nothing, and the page says
    so above the explanation (it showed only the prediction); the next run clears it."""
    from PIL import Image

    from service.demo.digits import sample_png

    blank, digit = tmp_path / "blank.png", tmp_path / "digit.png"
    Image.new("L", (16, 16), 255).save(blank)
    digit.write_bytes(sample_png(3))
    page.select_option("#model", "digits-cnn")
    page.set_input_files("#image", str(blank))
    page.click("#run")
    page.wait_for_selector("#warnings", state="visible")
    assert "nearly uniform" in page.text_content("#warnings")
    screenshot(page, "warnings")
    page.set_input_files("#image", str(digit))
    page.click("#run")
    page.wait_for_selector("#image-view", state="visible")
    assert page.is_hidden("#warnings")


def test_reference_mode_asks_for_the_removal_baseline(page: Any, tmp_path: Path) -> None:
    """Mode reference on an image explains from the image blurred (``relevance.reference``),
    and its heatmap is drawn."""
    from service.demo.digits import sample_png

    digit = tmp_path / "digit.png"
    digit.write_bytes(sample_png(7))
    page.select_option("#model", "digits-cnn")
    page.set_input_files("#image", str(digit))
    page.select_option("#mode", "reference")
    with page.expect_request("**/run_task") as request:
        page.click("#run")
    body = request.value.post_data_json
    assert body["relevance"] == {"mode": "reference", "multiplier": 100, "reference": "blur"}
    page.wait_for_selector("#image-view", state="visible")
    assert page.text_content("#image-label").startswith("Predicted: ")


def test_text_classification_label_and_contrast_rows(page: Any) -> None:
    page.select_option("#model", "minilm-sentiment")
    page.fill("#text", "what a wonderful film, i loved it")
    page.select_option("#mode", "contrast")
    page.click("#run")
    page.wait_for_selector("#text-view", state="visible")
    assert page.text_content("#label").startswith("Predicted: positive")
    assert page.locator("#probabilities tr").count() == 2
    rows = page.locator("#text-tokens p")
    assert [rows.nth(i).get_attribute("aria-label") for i in range(2)] == [
        "Supporting",
        "Opposing",
    ]
    assert page.locator("#text-tokens .token").first.text_content() == "[CLS]"
    assert page.locator("#text-tokens .token[data-relevance]").count() > 0
    assert "100" in page.text_content("#conservation")  # the seed is the multiplier
    screenshot(page, "text")


def test_errors_are_shown(page: Any) -> None:
    page.select_option("#model", "tiny-lookup-lm")
    page.fill("#text", "a3 c1 ? a")
    page.fill("#max-new-tokens", "500")
    page.click("#run")
    page.wait_for_selector("#error", state="visible")
    assert "generation.max_new_tokens" in page.text_content("#error")
    screenshot(page, "error")


def test_generation_settings_reach_the_api(page: Any) -> None:
    """Sampling, the batched path (relevance after decoding) and contrast mode, from the form
    to the request body and back as a shaded matrix."""
    page.select_option("#model", "tiny-lookup-lm")
    page.fill("#text", "b2 d7 e5 g1 ? e")
    page.fill("#max-new-tokens", "3")
    assert page.is_disabled("#top-k"), "sampling settings are off for greedy decoding"
    page.check("#sampling")
    page.fill("#temperature", "0.7")
    page.fill("#top-k", "3")
    page.fill("#seed", "7")
    page.select_option("#path", "batched")
    page.select_option("#mode", "contrast")
    with page.expect_request("**/run_task") as request:
        page.click("#run")
    body = request.value.post_data_json
    assert body["generation"] == {
        "max_new_tokens": 3,
        "num_beams": 1,
        "path": "batched",
        "do_sample": True,
        "top_k": 3,
        "seed": 7,
    }
    assert body["relevance"] == {"mode": "contrast", "multiplier": 100, "temperature": 0.7}
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Finished')")
    steps = page.locator("#sequence button.generated").count()
    page.click("#matrix-view summary")
    columns = page.locator("#matrix thead th.selected")
    assert columns.count() == 1 and steps >= 1
    shaded = page.locator("#matrix tbody tr:first-child td[data-relevance]").count()
    assert shaded == steps, "every generated token's relevance reached the matrix"
    screenshot(page, "generation-sampling")


def test_timings_read_as_text_and_icon_is_served(page: Any, stack: Stack) -> None:
    """A classification's timings include its batch (jobs and rows), shown as words, never
    as "[object Object]"; the page's icon is there; the model's description says what it
    expects."""
    page.select_option("#model", "minilm-sentiment")
    assert "Expects: English text" in page.text_content("#model-description")
    page.fill("#text", "a quiet, decent film")
    page.click("#run")
    page.wait_for_selector("#report", state="visible")
    timings = page.text_content("#timings")
    assert "[object Object]" not in timings
    assert "batch" in timings and "jobs" in timings and "rows" in timings, timings
    icon = httpx.get(f"{stack.url}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/")
