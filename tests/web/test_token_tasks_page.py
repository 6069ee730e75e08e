"""The page in a real browser with the tasks of several seeds per row (issue 16, item 2):
a token classifier and a question-answering model of the test registry (tiny random BERTs),
chosen on the page, run through the real API and worker; the page draws each token's label
(or the answer) and one shaded relevance row per seed, and its conservation report adds up."""

from __future__ import annotations

from typing import Any

from tests.helpers.browser import screenshot

# Per relevance row: its caption and the relevance of each token (null when unshaded).
ROWS = """() => [...document.querySelectorAll('#text-tokens p.tokens')].map(row => ({
  caption: row.getAttribute('aria-label'),
  tokens: [...row.querySelectorAll('.token')].map(el => el.textContent),
  relevance: [...row.querySelectorAll('.token')].map(
    el => el.dataset.relevance === undefined ? null : Number(el.dataset.relevance)),
}))"""
# The report's numbers: seed, at the inputs, sinks, and the gap in % of the seed.
REPORT = """() => [...document.querySelectorAll('#conservation dd')].map(dd => dd.textContent)"""


def _run(page: Any, model: str, text: str) -> list[dict[str, Any]]:
    page.select_option("#model", model)
    assert page.is_visible("#text"), "the task takes text"
    page.fill("#text", text)
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Finished')")
    assert page.is_hidden("#error"), page.text_content("#error")
    seed, _, _, gap = page.evaluate(REPORT)[:4]
    assert float(seed) != 0 and gap.endswith("% of the seed"), (seed, gap)
    assert abs(float(gap.split("%")[0])) <= 0.01, gap  # inputs + sinks = seed, to 1e-4
    assert page.is_hidden("#heatmap-link"), "no heatmap for this task"
    return page.evaluate(ROWS)


def test_token_classification_labels_and_a_row_per_token(page: Any) -> None:
    rows = _run(page, "tiny-bert-tokens", "tom lives in paris")
    tokens = ["[CLS]", "tom", "lives", "in", "paris", "[SEP]"]
    label = page.text_content("#label")
    assert label.startswith("Labels: [CLS]/"), label
    assert len(rows) == len(tokens)
    for k, row in enumerate(rows):
        assert row["tokens"] == tokens
        assert row["caption"].startswith(f"{tokens[k]} → "), row["caption"]
        assert all(r is not None for r in row["relevance"]), row
        assert any(r != 0 for r in row["relevance"]), row
    screenshot(page, "token-classification")


def test_question_answering_answer_and_start_end_rows(page: Any) -> None:
    rows = _run(page, "tiny-bert-qa", "who lives in paris [SEP] tom lives in paris")
    assert page.text_content("#label").startswith("Answer: ")
    assert [row["caption"] for row in rows] == ["start", "end"]
    for row in rows:
        assert row["tokens"][0] == "[CLS]" and len(row["tokens"]) == 11
        assert all(r is not None for r in row["relevance"]) and any(row["relevance"]), row
    screenshot(page, "question-answering")
