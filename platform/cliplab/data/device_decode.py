"""`data.decode: device`: loader workers ship JPEG bytes and the drawn crop; the training device decodes and crops.

Loader side (`probe_jpeg`, `encoded_payload`): a sample whose image is a JPEG in RGB or grey goes as its
bytes plus the crop box and flip that `augment.draw_train_view` drew from the sample's own hash RNG,
so the geometry is the CPU path's. Any other image (PNG, WebP, CMYK JPEG) is decoded and augmented in
the loader worker as before and travels finished.

Device side (`DeviceDecoder`): one batched `torchvision.io.decode_jpeg` on the device, then per image
PIL's own bicubic resampling of the crop box (same filter, support, coefficient rounding and 8-bit
rounding after each pass, horizontal pass first), the flip, and `to_tensor` + `normalize` in float32.
On CPU this reproduces the CPU path up to PIL's pass order (see docs/data-loading.md for the tolerance).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

log = logging.getLogger("cliplab.data")
JPEG_KEYS = ("jpg", "jpeg")
Box = tuple[int, int, int, int]
PRECISION = 2.0**22  # PIL's fixed-point coefficient precision for 8-bit images (PRECISION_BITS = 32 - 8 - 2)


def probe_jpeg(raw: dict[str, Any]) -> tuple[bytes, int, int] | None:
    """(bytes, width, height) of a sample's image if the device can decode it (an RGB or grey JPEG), else None.

    Reads the header only; a sample that fails here takes the CPU path, which skips it if it is corrupt.
    """
    data = next((raw[k] for k in JPEG_KEYS if k in raw), None)
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            return data, img.width, img.height
    except Exception:
        return None


def encoded_payload(rows: list[tuple[bytes, Box, bool] | torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's images as three tensors: concatenated JPEG bytes, their (row, size, box, flip), finished rows.

    `rows` holds, per batch row, either (JPEG bytes, pixel box, flip) or an already normalised image.
    """
    chunks, meta, done = [], [], []
    for i, row in enumerate(rows):
        if isinstance(row, torch.Tensor):
            done.append(row)
            continue
        data, box, flip = row
        chunks.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        meta.append([i, len(data), *box, int(flip)])
    out = {
        "jpeg": torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8),
        "jpeg_meta": torch.tensor(meta, dtype=torch.int64).reshape(-1, 7),
    }
    if done:
        out["decoded"] = torch.stack(done)
    return out


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5)."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(
    length: int, start: int, stop: int, size: int, device: torch.device
) -> tuple[torch.Tensor, int, int]:
    """PIL's bicubic coefficients from source range [start, stop) of `length` to `size`: (weights, lo, hi).

    Rows of the (size, hi - lo) matrix weigh source pixels lo..hi-1, normalised and rounded to PIL's fixed point.
    """
    scale = (stop - start) / size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    lo = max(int(start + 0.5 * scale - support + 0.5), 0)  # the first and last rows' bounds, on the host: no sync
    hi = min(int(start + (size - 0.5) * scale + support + 0.5), length)
    centre = start + (torch.arange(size, dtype=torch.float64, device=device) + 0.5) * scale
    first = (centre - support + 0.5).trunc().clamp(min=0)
    last = (centre + support + 0.5).trunc().clamp(max=length)
    x = torch.arange(lo, hi, dtype=torch.float64, device=device)
    w = _bicubic((x[None] - centre[:, None] + 0.5) / filter_scale)
    w = torch.where((x[None] >= first[:, None]) & (x[None] < last[:, None]), w, torch.zeros_like(w))
    w = w / w.sum(1, keepdim=True)
    return w.sign() * (w.abs() * PRECISION + 0.5).floor() / PRECISION, lo, hi


def resized_crop(img: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float64 (3, size, size) of 8-bit values: `PIL.Image.resize(BICUBIC, box=box)`."""
    _, height, width = img.shape
    x0, y0, x1, y1 = box
    wy, ylo, yhi = resample_weights(height, y0, y1, size, img.device)
    out = img[:, ylo:yhi].to(torch.float64)
    if (x0, x1) != (0, width) or size != width:
        wx, xlo, xhi = resample_weights(width, x0, x1, size, img.device)
        out = (out[..., xlo:xhi] @ wx.T + 0.5).floor().clamp(0, 255)
    if (y0, y1) != (0, height) or size != height:
        out = (wy @ out + 0.5).floor().clamp(0, 255)
    return out


class DeviceDecoder:
    """Turns a batch's encoded images into the normalised `image` tensor on `device`."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.size, self.device = size, device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with `jpeg`, `jpeg_meta` and `decoded` replaced by `image` (float32, on the device)."""
        batch = dict(batch)
        data, meta = batch.pop("jpeg"), batch.pop("jpeg_meta")
        done = batch.pop("decoded", None)
        rows = meta.tolist()
        count = len(rows) + (0 if done is None else done.shape[0])
        image = torch.empty(count, 3, self.size, self.size, dtype=torch.float32, device=self.device)
        if done is not None:
            encoded = {row[0] for row in rows}
            finished = [i for i in range(count) if i not in encoded]
            image[finished] = done.to(self.device, non_blocking=done.is_pinned())
        chunks = list(torch.split(data, [row[1] for row in rows])) if rows else []
        for row, decoded in zip(rows, self._decode(chunks), strict=True):
            image[row[0]] = self._view(decoded, tuple(row[2:6]), bool(row[6]))
        batch["image"] = image
        return batch

    def _decode(self, chunks: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Batched decode; if it fails, one by one, so one bad image costs only its own row (None)."""
        if not chunks:
            return []
        try:
            return list(decode_jpeg(chunks, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for chunk in chunks:
                try:
                    out.append(decode_jpeg(chunk, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as exc:
                    log.warning("device decode: an undecodable JPEG becomes a mean-colour image: %s", exc)
                    out.append(None)
            return out

    def _view(self, img: torch.Tensor | None, box: Box, flip: bool) -> torch.Tensor:
        """The normalised train view of one decoded image (zeros, the mean colour, for an undecodable one)."""
        if img is None:
            return torch.zeros(3, self.size, self.size, device=self.device)
        crop = resized_crop(img, box, self.size).to(torch.float32)
        if flip:
            crop = crop.flip(-1)
        return crop.div(255).sub_(self.mean).div_(self.std)
