"""The API reads a PNG's size from its header bytes (``validation.png_size``) instead of
asking Pillow; it must never vouch for a file Pillow would refuse, nor read another size."""

from __future__ import annotations

import io
import random

from PIL import Image

from service.api.validation import png_size
from service.demo.digits import sample_png


def _pngs() -> list[bytes]:
    out = [sample_png(0)]
    for mode in ("1", "L", "P", "RGB", "RGBA", "I;16", "LA"):
        buf = io.BytesIO()
        Image.new(mode, (7, 5)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _pillow(raw: bytes) -> tuple[str | None, tuple[int, int]] | None:
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return img.format, img.size
    except Exception:  # noqa: BLE001 - any refusal counts as one
        return None


def test_png_size_agrees_with_pillow_on_damaged_headers() -> None:
    """Every prefix and many one-byte damages of the header: where png_size answers,
    Pillow opens the file as a PNG of that size; and it answers for the demo's digits
    (files with chunks between IHDR and IDAT, a palette say, go to Pillow)."""
    assert png_size(sample_png(0)) == _pillow(sample_png(0))[1] == (16, 16)
    rng = random.Random(0)
    vouched = 0
    for good in _pngs():
        cases = [good[:n] for n in range(len(good))]
        for _ in range(200):
            bad = bytearray(good)
            bad[rng.randrange(min(60, len(bad)))] = rng.randrange(256)
            cases.append(bytes(bad))
        for raw in cases:
            size = png_size(raw)
            if size is not None:
                vouched += 1
                assert _pillow(raw) == ("PNG", size), raw[:41]
    assert vouched > 100  # the damaged cases did exercise the fast path


def test_png_size_leaves_other_formats_to_pillow() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5)).save(buf, "JPEG")
    assert png_size(buf.getvalue()) is None
    assert png_size(b"junk") is None
