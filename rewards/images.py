"""Images of any mode and bit depth as 8-bit RGB: what every reader of a dataset's images (the run's checks and
conditioning in common/data.py, the remote rewards' /compute payload) converts them with. Here, in rewards/, because
rewards/ imports nothing from common/ and common/ may import from rewards/."""
import numpy as np
from PIL import Image


def _gray(a: np.ndarray) -> Image.Image:
    """Rounded 8-bit gray levels (float array already on the 0..255 scale) -> RGB."""
    return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is dropped, as diffusers' load_image does (a transparent pixel keeps its
    stored colour; a palette image its palette colour). 16-bit gray ("I;16*", and "I", which holds 16-bit PNGs in
    older Pillow) is scaled by 255/65535 (1/257) and rounded; 32-bit integers outside 0..65535 are refused.
    Float ("F") is read as [0, 1] when all samples lie there, else as 0..255; other values are refused.
    Raises ValueError (the caller names the file)."""
    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(im).astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"{mode} samples {lo}..{hi} lie outside 0..65535 (no known bit depth); save it as an "
                             "8- or 16-bit image")
        return _gray(a / 257)
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("float image with NaN or infinite samples")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise ValueError(f"float samples {lo:g}..{hi:g} lie outside [0, 1] and [0, 255]; save it as an 8- or "
                             "16-bit image")
        return _gray(a * 255 if hi <= 1 else a)
    if mode == "La":  # premultiplied: Pillow goes to RGB only through LA
        im = im.convert("LA")
    elif mode in ("P", "PA") and "transparency" in im.info:  # through RGBA: no palette-transparency warning
        im = im.convert("RGBA")
    return im.convert("RGB")
