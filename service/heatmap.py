"""PNG heatmaps drawn with numpy and Pillow only (the API process has no torch or
matplotlib): red for positive relevance, blue for negative, white for none, with the colour
scale under each picture."""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def diverging(values: np.ndarray) -> np.ndarray:
    """uint8 RGB for values scaled by their largest magnitude (symmetric, so 0 stays white)."""
    v = np.asarray(values, dtype=np.float32)
    peak = float(np.abs(v).max()) or 1.0
    v = np.clip(v / peak, -1, 1)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], -1)
    return (rgb * 255).round().astype(np.uint8)


# Label fonts, the first found is used: Pillow's own (Aileron) has no accented letters,
# Cyrillic or CJK, and drew 'café' or 'Жизнь' as boxes. Noto Sans CJK (Debian's
# fonts-noto-cjk, in the image) covers CJK and Latin; DejaVu Sans (fonts-dejavu-core, and
# matplotlib's copy where the engine extra is installed) Latin, Greek and Cyrillic.
FONT_FILES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)
FONT_SIZE = 10


@functools.cache
def label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The first of ``FONT_FILES`` (then matplotlib's DejaVu Sans, found without importing
    matplotlib) that exists, else Pillow's default."""
    mpl = importlib.util.find_spec("matplotlib")
    bundled = [] if mpl is None or mpl.origin is None else [
        Path(mpl.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    ]  # fmt: skip
    for path in [*map(Path, FONT_FILES), *bundled]:
        if path.is_file():
            return ImageFont.truetype(str(path), FONT_SIZE)
    return ImageFont.load_default(FONT_SIZE)


SCALE_H = 46  # the colour scale under a heatmap: a bar, its labels and what max is


def with_scale(img: Image.Image, note: str) -> Image.Image:
    """``img`` with the colour scale under it: the diverging colours from -1 to +1 of the
    largest magnitude, labelled, and ``note`` saying what that magnitude is taken over."""
    font = label_font()
    bar_w = max(120, min(img.width - 8, 300))
    note_w = int(_text_width(font, note)) + 8
    out = Image.new("RGB", (max(img.width, bar_w + 8, note_w), img.height + SCALE_H), "white")
    out.paste(img, (0, 0))
    bar = diverging(np.linspace(-1, 1, bar_w, dtype=np.float32))
    strip = Image.fromarray(np.repeat(bar[None], 10, axis=0))
    y = img.height + 4
    out.paste(strip, (4, y))
    draw = ImageDraw.Draw(out)
    draw.rectangle([3, y - 1, 4 + bar_w, y + 10], outline="grey")
    draw.text((4, y + 12), "-max", fill="black", font=font)
    draw.text((4 + bar_w // 2 - 3, y + 12), "0", fill="black", font=font)
    draw.text((bar_w - 20, y + 12), "+max", fill="black", font=font)
    draw.text((4, y + 26), note, fill="black", font=font)
    return out


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_overlay(image_png_b64: str, relevance_map: np.ndarray, size: int = 256) -> bytes:
    """The input picture (grey) with the relevance map blended over it, side by side with the
    map alone."""
    base = Image.open(io.BytesIO(base64.b64decode(image_png_b64))).convert("L").convert("RGB")
    base = base.resize((size, size), Image.Resampling.NEAREST)
    heat = Image.fromarray(diverging(relevance_map)).resize((size, size), Image.Resampling.NEAREST)
    out = Image.new("RGB", (2 * size + 8, size), "white")
    out.paste(Image.blend(base, heat, 0.55), (0, 0))
    out.paste(heat, (size + 8, 0))
    return _png(with_scale(out, "max: the largest |relevance| of the image"))


def token_grid(rows: list[np.ndarray], col_labels: list[str], row_labels: list[str]) -> bytes:
    """One row per explained step (or per text), one cell per token; rows may be shorter
    than the widest (a generation step sees only the tokens before it)."""
    return _png(with_scale(_grid(rows, col_labels, row_labels), ROW_NOTE))


def text_rows(rows: list[np.ndarray], tokens: list[list[str]], row_labels: list[str]) -> bytes:
    """One row per text under that text's own tokens: texts of a batch differ in their
    tokens, and every row's cells were labelled with the first text's. Texts of the same
    tokens share one header."""
    if all(t == tokens[0] for t in tokens):
        return token_grid(rows, tokens[0], row_labels)
    names = row_labels + [""] * (len(rows) - len(row_labels))
    grids = [_grid([r], t, [n]) for r, t, n in zip(rows, tokens, names, strict=True)]
    out = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    y = 0
    for g in grids:
        out.paste(g, (0, y))
        y += g.height
    return _png(with_scale(out, ROW_NOTE))


ROW_NOTE = "max: each row's largest |relevance|"


def _grid(rows: list[np.ndarray], col_labels: list[str], row_labels: list[str]) -> Image.Image:
    """The cells of ``token_grid`` under their rotated column labels, without the scale."""
    font = label_font()
    cell_w, cell_h, left, top = 28, 18, 90, 70
    width = max((len(r) for r in rows), default=0)
    img = Image.new(
        "RGB", (left + cell_w * max(width, 1) + 4, top + cell_h * max(len(rows), 1) + 4), "white"
    )
    draw = ImageDraw.Draw(img)
    for i, row in enumerate(rows):
        colours = diverging(row)
        for j in range(len(row)):
            x, y = left + j * cell_w, top + i * cell_h
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=tuple(colours[j].tolist()))
        if i < len(row_labels):
            draw.text((4, top + i * cell_h + 3), row_labels[i][:14], fill="black", font=font)
    for j, label in enumerate(col_labels[:width]):
        tile = Image.new("RGBA", (top - 4, cell_w), (255, 255, 255, 0))
        ImageDraw.Draw(tile).text((2, 8), label[:10], fill="black", font=font)
        img.paste(
            tile.rotate(90, expand=True), (left + j * cell_w, 2), tile.rotate(90, expand=True)
        )
    return img
