"""Training augmentation: random resize-and-crop, flips, quarter turns and photometric jitter (``augment=``).

Every random choice of a training sample is drawn from ``np.random.default_rng((seed, epoch, index))``, so
epochs differ, a run is reproducible, any DataLoader worker draws the same sample for the same key, and a run
resumed mid-epoch sees exactly the samples it would have seen. The draw (:meth:`Augment.draw`) happens before
the sample is read, because the random resize is realised by *what is read*: a zoom ``s`` reads a source
window of side ``crop / s`` (from the tile, or the scene padded with no-data and ignore labels), which is then
resized to ``crop``. That equals resizing the whole image by ``s`` and cropping ``crop`` from it (the
DELIVER/CMNeXt and mmsegmentation recipes), without resizing a 6000 x 6000 tile per sample.

Geometric transforms apply identically to every modality and to the mask, through torchvision's
``transforms.v2.functional`` on ``tv_tensors``: images bilinear with antialiasing, the mask and categorical
rasters (``Modality.kind == "categorical"``) nearest. Photometric jitter and blur touch only optical
modalities (scaled by their ``value_max`` into [0, 1], as torchvision expects, and clipped there), never
heights, SAR, other encodings or labels. Missing modalities are neither read nor transformed: the caller fills
them with exact zeros afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from sgma.checks import check_flag
from sgma.metrics import IGNORE_INDEX
from sgma.modalities import Modality


@dataclass(frozen=True)
class Draw:
    """One sample's random choices: the source window side, flips, quarter turns and optical jitter."""

    window: int
    hflip: bool = False
    vflip: bool = False
    quarter_turns: int = 0
    brightness: float | None = None  # factors (1 = unchanged); None: no jitter for this sample
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None  # shift, a fraction of the hue circle
    blur_sigma: float | None = None


def _check_probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"augment.{name} must be a probability in [0, 1], got {value}")
    return value


def _check_strength(name: str, value: float, upper: float | None = None) -> float:
    value = float(value)
    if value < 0 or (upper is not None and value > upper) or not math.isfinite(value):
        limit = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"augment.jitter.{name} must be >= 0{limit}, got {value}")
    return value


class Augment:
    """The training transform of one ``augment`` config.

    - ``scale``: (low, high) range of the random zoom, drawn uniformly as in CMNeXt's RandomResizedCrop and
      mmsegmentation's RandomResize (null = no zoom: the crop is read as is);
    - ``hflip``, ``vflip``: flip probabilities; ``rotate90``: a uniform number of quarter turns (0-3);
    - ``jitter``: photometric jitter of optical modalities, applied to a sample with probability ``p``:
      ``brightness``/``contrast``/``saturation`` factors uniform in [1 - v, 1 + v], ``hue`` shift uniform in
      [-v, v] (at most 0.5); one draw per sample, shared by its optical modalities (one acquisition);
      saturation and hue only for 3-channel images;
    - ``blur``: Gaussian blur of optical modalities with probability ``p``, ``kernel`` side, sigma uniform in
      ``sigma``.
    """

    def __init__(
        self,
        *,
        scale: Sequence[float] | None = None,
        hflip: float = 0.0,
        vflip: float = 0.0,
        rotate90: bool = False,
        jitter: Mapping[str, float] | None = None,
        blur: Mapping[str, object] | None = None,
    ) -> None:
        if scale is not None:
            low, high = (float(v) for v in scale)
            if not 0 < low <= high or not math.isfinite(high):
                raise ValueError(f"augment.scale must be [low, high] with 0 < low <= high, got {list(scale)}")
            scale = (low, high)
        self.scale = scale
        self.hflip = _check_probability("hflip", hflip)
        self.vflip = _check_probability("vflip", vflip)
        self.rotate90 = check_flag("augment.rotate90", rotate90)
        jitter = dict(jitter or {})
        unknown = set(jitter) - {"p", "brightness", "contrast", "saturation", "hue"}
        if unknown:
            raise ValueError(
                f"augment.jitter has unknown keys {sorted(unknown)}; use p, brightness, contrast, saturation, hue"
            )
        self.jitter_p = _check_probability("jitter.p", jitter.get("p", 0.0))
        self.brightness = _check_strength("brightness", jitter.get("brightness", 0.0), 1.0)
        self.contrast = _check_strength("contrast", jitter.get("contrast", 0.0), 1.0)
        self.saturation = _check_strength("saturation", jitter.get("saturation", 0.0), 1.0)
        self.hue = _check_strength("hue", jitter.get("hue", 0.0), 0.5)
        blur = dict(blur or {})
        unknown = set(blur) - {"p", "kernel", "sigma"}
        if unknown:
            raise ValueError(f"augment.blur has unknown keys {sorted(unknown)}; use p, kernel, sigma")
        self.blur_p = _check_probability("blur.p", blur.get("p", 0.0))
        self.blur_kernel = int(blur.get("kernel", 3))
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"augment.blur.kernel must be an odd number >= 1, got {self.blur_kernel}")
        low, high = (float(v) for v in blur.get("sigma", (0.1, 2.0)))
        if not 0 < low <= high:
            raise ValueError(f"augment.blur.sigma must be [low, high] with 0 < low <= high, got {[low, high]}")
        self.blur_sigma = (low, high)

    def __repr__(self) -> str:
        jitter = (self.jitter_p, self.brightness, self.contrast, self.saturation, self.hue)
        blur = (self.blur_p, self.blur_kernel, self.blur_sigma)
        return (
            f"Augment(scale={self.scale}, hflip={self.hflip}, vflip={self.vflip}, rotate90={self.rotate90}, "
            f"jitter(p, b, c, s, h)={jitter}, blur(p, kernel, sigma)={blur})"
        )

    # the draw --------------------------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator, crop: int) -> Draw:
        """One sample's choices; always consumes the same number of variates, whichever options are on, so
        switching one option leaves the others' draws unchanged."""
        u = rng.random(12)
        window = crop
        if self.scale is not None:
            low, high = self.scale
            window = max(1, round(crop / (low + u[0] * (high - low))))
        draw = {
            "window": window,
            "hflip": bool(u[1] < self.hflip),
            "vflip": bool(u[2] < self.vflip),
            "quarter_turns": int(u[3] * 4) % 4 if self.rotate90 else 0,
        }
        if u[4] < self.jitter_p:
            draw["brightness"] = 1.0 + self.brightness * (2 * u[5] - 1)
            draw["contrast"] = 1.0 + self.contrast * (2 * u[6] - 1)
            draw["saturation"] = 1.0 + self.saturation * (2 * u[7] - 1)
            draw["hue"] = self.hue * (2 * u[8] - 1)
        if u[9] < self.blur_p:
            low, high = self.blur_sigma
            draw["blur_sigma"] = low + u[10] * (high - low)
        return Draw(**draw)

    # the transform ---------------------------------------------------------------------------------------
    def __call__(
        self, sample: dict[str, Tensor], draw: Draw, modalities: Sequence[Modality], crop: int
    ) -> dict[str, Tensor]:
        """Transform ``sample`` (raw (C, h, w) float tensors of the listed ``modalities`` and ``mask`` (h, w):
        a window of side ``draw.window`` clipped to its image) into ``crop``-sided tensors.

        The order is CMNeXt's: photometric on the image as read, then resize by ``crop / draw.window``, pad to
        ``crop`` (zeros, ignore labels), flips and quarter turns. Returns a new dict with the same keys.
        """
        height, width = sample["mask"].shape
        geometric = draw.window != crop or draw.hflip or draw.vflip or draw.quarter_turns
        if (height, width) == (crop, crop) and not geometric and draw.brightness is None and draw.blur_sigma is None:
            return sample
        out = dict(sample)
        for m in modalities:
            if m.kind == "optical":
                out[m.name] = self._photometric(out[m.name], m, draw)
        continuous = [m for m in modalities if m.kind != "categorical"]
        categorical = [m for m in modalities if m.kind == "categorical"]
        # one stack per interpolation and fill, so that each geometric step is one call for all modalities
        stacks = [
            (continuous, InterpolationMode.BILINEAR, 0.0),
            (categorical, InterpolationMode.NEAREST_EXACT, 0.0),
            ([], InterpolationMode.NEAREST_EXACT, float(IGNORE_INDEX)),  # the mask
        ]
        size = [max(1, round(height * crop / draw.window)), max(1, round(width * crop / draw.window))]
        for group, interpolation, fill in stacks:
            if group:
                x = torch.cat([out[m.name].float() for m in group])
            elif fill == IGNORE_INDEX:
                x = out["mask"][None].float()
            else:
                continue
            if size != [height, width]:
                wrap = tv_tensors.Image if interpolation == InterpolationMode.BILINEAR else tv_tensors.Mask
                x = TF.resize(wrap(x), size, interpolation=interpolation, antialias=True).as_subclass(Tensor)
            if size != [crop, crop]:
                x = TF.pad(x, [0, 0, crop - size[1], crop - size[0]], fill=fill)  # left, top, right, bottom
            x = _orient(x, draw).contiguous()
            if not group:
                out["mask"] = x[0].round().to(sample["mask"].dtype)
                continue
            start = 0
            for m in group:
                out[m.name] = x[start : start + m.channels]
                start += m.channels
        return out

    def _photometric(self, x: Tensor, modality: Modality, draw: Draw) -> Tensor:
        if draw.brightness is None and draw.blur_sigma is None:
            return x
        scale = float(modality.value_max)
        y = (x / scale).clamp(0.0, 1.0)
        if draw.brightness is not None:
            y = TF.adjust_brightness(y, draw.brightness)
            if y.shape[0] == 3:
                y = TF.adjust_contrast(y, draw.contrast)  # around the image's grey mean
                y = TF.adjust_saturation(y, draw.saturation)
                y = TF.adjust_hue(y, draw.hue)
            else:  # each band around its own mean (torchvision's contrast takes 1 or 3 channels)
                y = TF.adjust_contrast(y[:, None], draw.contrast)[:, 0]
        if draw.blur_sigma is not None:
            y = TF.gaussian_blur(y, [self.blur_kernel] * 2, [draw.blur_sigma] * 2)
        return y * scale


def _orient(x: Tensor, draw: Draw) -> Tensor:
    """Flips then quarter turns of a (C, H, W) stack (exact pixel permutations)."""
    if draw.hflip:
        x = TF.horizontal_flip(x)
    if draw.vflip:
        x = TF.vertical_flip(x)
    if draw.quarter_turns:
        x = torch.rot90(x, draw.quarter_turns, dims=(-2, -1))
    return x
