"""Artefacts of the browser tests (tests/web): screenshots kept under artifacts/web."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers.stack import ROOT

ARTIFACTS = ROOT / "artifacts" / "web"


def screenshot(page: Any, name: str) -> Path:
    """Keep a picture of the page as a test artefact (artifacts/ is gitignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
