"""The explanation page: plain HTML, CSS and JS shipped in ``service/static`` and served by
the API itself, so it works offline and needs no build step or second server."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")


def mount(app: FastAPI) -> None:
    """``/`` serves the page, ``/static`` its assets and ``/favicon.ico`` the icon, all
    public even when API keys are configured: they hold no data, and every call the page
    makes is authorized as usual."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.ico", headers={"Cache-Control": "max-age=86400"})
