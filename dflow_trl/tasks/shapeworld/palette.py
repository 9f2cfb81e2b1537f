"""ShapeWorld's colour palette: token ids, colour names, embeddings and pictures of grids.

An image is a ``GRID × GRID`` grid of palette tokens. Token 0 is the background; every other token
is a named, saturated colour. A token's embedding *is* its colour, so a metric-induced path over
these embeddings moves through colour space.

Embedding choice: centred RGB, ``rgb - 0.5``, shape ``(V, 3)``. ``MetricInducedPath``
L2-normalises the rows, which keeps only the direction. In plain RGB the dark-grey background
would point along the grey diagonal, next to the least saturated colours (pink would sit at a
metric distance ``d = ‖ê−ê'‖⁴`` of only 0.055 from it, so background/object would be the *last*
thing the path resolves). Centred, the background points to the dark corner, opposite the bright
saturated colours: every colour is at ``d ≥ 1.0`` from the background, any two colours at
``d ≥ 0.08`` (orange–yellow the closest), so the path settles the silhouette first, then the hue.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

GRID = 16
CANVAS_LENGTH = GRID * GRID
BACKGROUND = 0

# Order fixes the token ids: id i is _PALETTE[i].
_PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("background", (0.10, 0.10, 0.10)),
    ("red", (0.95, 0.05, 0.05)),
    ("orange", (1.00, 0.45, 0.00)),
    ("yellow", (1.00, 0.95, 0.00)),
    ("green", (0.00, 0.80, 0.10)),
    ("cyan", (0.00, 0.85, 0.85)),
    ("blue", (0.10, 0.30, 1.00)),
    ("purple", (0.55, 0.05, 1.00)),
    ("pink", (1.00, 0.20, 0.65)),
)

PALETTE_SIZE = len(_PALETTE)
# Names of the object colours (every token but the background), in token order.
COLORS: tuple[str, ...] = tuple(name for name, _ in _PALETTE[1:])
COLOR_TO_TOKEN: dict[str, int] = {name: i for i, (name, _) in enumerate(_PALETTE) if i != BACKGROUND}
TOKEN_TO_COLOR: dict[int, str] = {i: name for i, (name, _) in enumerate(_PALETTE)}


def palette_rgb() -> list[tuple[float, float, float]]:
    """The ``V`` palette colours as RGB triples in [0, 1], in token order."""
    return [rgb for _, rgb in _PALETTE]


def palette_embeddings() -> torch.Tensor:
    """``(V, 3)`` float32 centred RGB (``rgb − 0.5``): the token embeddings a metric-induced path runs on."""
    return torch.tensor(palette_rgb(), dtype=torch.float32) - 0.5


def color_token(name: str) -> int:
    """The palette token of a colour name."""
    try:
        return COLOR_TO_TOKEN[name]
    except KeyError:
        raise ValueError(f"unknown colour {name!r}; expected one of {list(COLORS)}") from None


def as_grid(grid: object) -> torch.Tensor:
    """A grid given as a ``(GRID, GRID)`` or flat ``(GRID*GRID,)`` array-like of palette tokens, as a
    ``(GRID, GRID)`` long tensor; ``ValueError`` on any other shape or on non-palette values."""
    t = grid if isinstance(grid, torch.Tensor) else torch.as_tensor(grid)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"grid must hold integer palette tokens, got dtype {t.dtype}")
    if t.shape == (CANVAS_LENGTH,):
        t = t.view(GRID, GRID)
    if t.shape != (GRID, GRID):
        raise ValueError(f"grid must have shape ({GRID}, {GRID}) or ({CANVAS_LENGTH},), got {tuple(t.shape)}")
    t = t.long()
    if int(t.min()) < 0 or int(t.max()) >= PALETTE_SIZE:
        raise ValueError(f"grid tokens must lie in [0, {PALETTE_SIZE}), got [{int(t.min())}, {int(t.max())}]")
    return t


def grid_to_image(grid: object, scale: int = 8) -> Image.Image:
    """The grid as an RGB picture, each cell a ``scale × scale`` block of its palette colour."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    g = as_grid(grid)
    lut = (torch.tensor(palette_rgb()) * 255).round().to(torch.uint8)
    rgb = lut[g]  # (GRID, GRID, 3)
    rgb = rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return Image.fromarray(rgb.numpy(), mode="RGB")


def _is_grid(x: object) -> bool:
    """Whether ``x`` is one grid (an array, ``CANVAS_LENGTH`` ints, or ``GRID`` rows of ``GRID`` ints)
    rather than a sequence of grids."""
    if hasattr(x, "shape"):  # torch tensors and numpy arrays
        return len(x.shape) <= 2 and math.prod(x.shape) == CANVAS_LENGTH
    first = x[0]
    if _is_int(first):
        return True
    return len(x) == GRID and not hasattr(first, "shape") and len(first) == GRID and _is_int(first[0])


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) or (hasattr(x, "shape") and len(x.shape) == 0)


def render_grid_strip(
    rows: Sequence[object],
    labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    scale: int = 8,
    gap: int = 4,
    marks: Sequence[Sequence[bool | None]] | None = None,
) -> Image.Image:
    """Grids side by side in one picture, e.g. before/after RL samples for the same prompts.

    ``rows`` is either a sequence of grids (one row) or a sequence of rows of grids (all rows the
    same length). ``labels`` captions the columns (drawn under the last row); ``row_labels``
    captions the rows (drawn left of each row). ``marks`` (one per grid, shaped like the rows)
    frames a grid green (True: it satisfies its prompt), red (False) or not at all (None).
    """
    if len(rows) == 0:
        raise ValueError("render_grid_strip needs at least one grid")
    grid_rows = [list(rows)] if _is_grid(rows[0]) else [list(r) for r in rows]
    ncols = len(grid_rows[0])
    if any(len(r) != ncols for r in grid_rows):
        raise ValueError("every row of render_grid_strip must hold the same number of grids")
    if labels is not None and len(labels) != ncols:
        raise ValueError(f"got {len(labels)} labels for {ncols} columns")
    if row_labels is not None and len(row_labels) != len(grid_rows):
        raise ValueError(f"got {len(row_labels)} row labels for {len(grid_rows)} rows")
    if marks is not None and [len(m) for m in marks] != [len(r) for r in grid_rows]:
        raise ValueError(f"marks must hold one entry per grid ({len(grid_rows)} rows of {ncols})")

    cell = GRID * scale
    caption_h = 12 if labels else 0
    left_w = 8 + 6 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    width = left_w + ncols * cell + (ncols + 1) * gap
    height = len(grid_rows) * cell + (len(grid_rows) + 1) * gap + caption_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(grid_rows):
        y = gap + i * (cell + gap)
        if row_labels:
            draw.text((2, y + cell // 2 - 5), row_labels[i], fill=(0, 0, 0))
        for j, grid in enumerate(row):
            x = left_w + gap + j * (cell + gap)
            canvas.paste(grid_to_image(grid, scale), (x, y))
            mark = None if marks is None else marks[i][j]
            if mark is not None:
                colour = (0, 170, 0) if mark else (220, 0, 0)
                draw.rectangle((x - 2, y - 2, x + cell + 1, y + cell + 1), outline=colour, width=2)
    if labels:
        y = height - caption_h
        for j, text in enumerate(labels):
            # Long captions are clipped to the column so they never overlap their neighbours.
            draw.text((left_w + gap + j * (cell + gap), y), text[: max(1, cell // 6)], fill=(0, 0, 0))
    return canvas
