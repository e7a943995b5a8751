"""A contact sheet: every frame of a generated video on one PNG, in rows, numbered (for ``report``)."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import PIL.Image
import PIL.ImageDraw

from mvd_deploy.errors import MvdError


def read_video(path: Path, option: str = "--video") -> np.ndarray:
    """Frames (F, H, W, 3) uint8 of an MP4/GIF, or a one-line error naming it."""
    if not path.is_file():
        raise MvdError(f"{option} {path}: file not found")
    try:
        frames = np.asarray(iio.imread(path, index=None))
    except Exception as e:  # imageio raises its backends' own errors: all mean "not a video it can read"
        raise MvdError(f"{option} {path}: not a video imageio can read ({' '.join(str(e).split())[:200]})") from None
    if frames.ndim == 3:  # a single image
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise MvdError(f"{option} {path}: not an RGB video (frames of shape {list(frames.shape[1:])})")
    return frames[..., :3]


def contact_sheet(frames: np.ndarray, path: Path, columns: int | None = None, gap: int = 4) -> dict:
    """Write the frames as a grid (about as wide as tall, at least 2 per row), each labelled with its index."""
    count, height, width = frames.shape[:3]
    columns = columns or max(2, math.ceil(math.sqrt(count * height / width)))
    rows = math.ceil(count / columns)
    sheet = PIL.Image.new("RGB", (columns * (width + gap) + gap, rows * (height + gap) + gap), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for i, frame in enumerate(frames):
        x, y = gap + (i % columns) * (width + gap), gap + (i // columns) * (height + gap)
        sheet.paste(PIL.Image.fromarray(frame), (x, y))
        draw.text((x + 3, y + 2), str(i), fill="white", stroke_width=1, stroke_fill="black")
    sheet.save(path)
    return {"frames": count, "columns": columns, "rows": rows, "frame_size": [width, height]}
