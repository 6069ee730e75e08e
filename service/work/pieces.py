"""The text each token adds to its row, as the ``prompt`` and ``token`` events carry it.

A token decoded alone is not its share of the text: a byte-level BPE splits a character
of several bytes (emoji, most CJK) over tokens, each of which decodes alone to U+FFFD, and a
SentencePiece token decoded alone loses its leading space. Each row is decoded in a short
window of the tokens before, as text streamers do: a token adds what the window's text
gained with it, and nothing while that text ends in an incomplete character (its bytes come
with the token that completes it). The pieces of a row then join to its decoded text."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
CONTEXT = 5  # tokens decoded before the unread ones, for the tokenizer's spacing rules


class Row:
    """One row's tokens so far and where its text was last read."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here
        self.read = 0  # the text of ids[:read] is given out

    def add(self, tok: Any, token: int, last: bool = False) -> str:
        """The text ``token`` adds; with ``last``, also what incomplete bytes are held (a
        prompt's end: its pieces join to its text whatever follows)."""
        self.ids.append(token)
        before = tok.decode(self.ids[self.prefix : self.read])
        after = tok.decode(self.ids[self.prefix :])
        if (len(after) <= len(before) or after.endswith(REPLACEMENT)) and not last:
            return ""
        self.prefix, self.read = max(len(self.ids) - CONTEXT, 0), len(self.ids)
        return after[len(before) :]


class Pieces:
    """Each row's pieces as its tokens arrive: the prompt's at once, then one per step."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.rows: list[Row] = []

    def prompt(self, rows: list[list[int]]) -> list[list[str]]:
        """The prompt's pieces, row by row; each row's join to its decoded text."""
        self.rows = [Row() for _ in rows]
        return [
            [row.add(self.tok, t, last=k == len(ids) - 1) for k, t in enumerate(ids)]
            for row, ids in zip(self.rows, rows, strict=True)
        ]

    def step(self, ids: list[int], ended: list[bool], last: bool = False) -> list[str]:
        """The piece each row's new token adds (one token per row; a row that ``ended``
        before, at its end-of-sequence token, adds none with the padding it gets); the
        ``last`` step's include the bytes still held, so that each row's pieces join to its
        text."""
        if not self.rows:  # no prompt given: each row starts here
            self.rows = [Row() for _ in ids]
        return [
            "" if done else row.add(self.tok, t, last)
            for row, t, done in zip(self.rows, ids, ended, strict=True)
        ]
