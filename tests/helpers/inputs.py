"""Request payloads: images as the API takes them (base64 of a PNG)."""

from __future__ import annotations

import base64
import io

from PIL import Image


def digit_b64(index: int) -> str:
    """The demo digits model's sample ``index``: a real digit it classifies."""
    from service.demo.digits import sample_png

    return base64.b64encode(sample_png(index)).decode()


def blank_png_b64(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
