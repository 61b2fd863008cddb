"""Procedural remote-sensing scenes: the project's default dataset (no files, no downloads).

Each scene is generated deterministically from ``(seed, index, size)`` at a fixed ground sampling distance
(``GSD`` = 0.5 m/px, so a 128 px scene covers 64 m x 64 m and a 512 px one 256 m x 256 m) with the six
ISPRS classes and co-registered modalities in canonical order ``rgb, nir, dsm, sar``. Values are raw and
physical-ish (reflectance in [0, 1] for rgb/nir, metres for dsm, dB for sar); the dataset transform
normalises them later with the per-channel ``mean``/``std`` of :data:`MODALITIES`, which were measured on
200 training scenes at 128 px (``python -m sgma.data.synthetic`` re-measures them).

Layout: a rotated road grid (asphalt plus lighter sidewalks) on lawn; the blocks between roads are split
into parcels holding one building each (many sizes, aspect ratios and orientations, rectangles and
L-shapes, flat or pitched, some with a paved yard), a parking lot or nothing; trees as clusters of discs,
mostly on lawn; cars as small oriented rectangles parked along curbs, driving in lanes and in lot rows; a
little clutter (bins, containers, material piles). Cast shadows follow one sun per scene. Mean class
frequencies at 128 px: impervious 31 %, building 27 %, low vegetation 21 %, tree 16 %, car 4 %, clutter 2 %.

Why each modality alone is insufficient. Pair confusion of a per-pixel Gaussian-mixture classifier on
value + 5x5 local mean/std (:func:`modality_probe`, 12 train / 8 test scenes at 128 px): the share of a/b
pixels predicted as the other one, among those predicted a or b (0 = separable, 0.5 = chance). The last
row is the vegetation-vs-pavement error inside cast shadows.

============================  =====  =====  =====  =====
class pair                     rgb    nir    dsm    sar
============================  =====  =====  =====  =====
road vs roof                   0.23   0.37   0.01   0.11
road vs low vegetation         0.05   0.03   0.30   0.29
tree vs low vegetation         0.20   0.43   0.08   0.40
building vs tree               0.01   0.02   0.25   0.37
car vs road                    0.01   0.09   0.09   0.02
vegetation vs pavement, shade  0.17   0.02   0.32   0.26
============================  =====  =====  =====  =====

RGB dominates because it is the only modality that carries information about *every* class: colour
separates vegetation from pavement (outside shadow), most roofs (red tiles, bright or dark roofs) from
roads, cars (saturated paints) from asphalt, and texture partly separates tree crowns from lawn. Its
failures are specific: a third of the roofs are drawn from the pavement colour distribution (and dark or
bright roofs overlap dark asphalt and light sidewalks), tree and lawn greens overlap, and cast shadows
darken everything towards the same nearly colourless dark blue-grey. NIR only says
"vegetation or not" (roads, roofs, cars and clutter share one dark distribution; trees and lawn one bright
one), and DSM only says "how high" (road and lawn are both ground; pitched roofs and crowns overlap in
height and roughness). Each fragile modality fixes exactly one RGB failure (NIR: shaded vegetation; DSM:
grey roofs and tree vs lawn), so combinations are strong. Probe mIoU (6 classes) per pattern: rgb 58,
nir 26, dsm 38, sar 21, rgb+nir 59, rgb+dsm 75, nir+dsm 61, rgb+nir+dsm 82. Cross-modal conflicts are
injected on purpose: a few green roofs (vegetation in rgb/nir, building in dsm), a few buildings missing
from the DSM (built after the survey), and DSM noise spikes.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sgma.data.tiles import check_crop_size, random_window, read_window
from sgma.modalities import Modality, format_pattern, parse_pattern

CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))  # RGB
IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR, CLUTTER = range(len(CLASSES))

# mean/std of the raw generator output, measured on 200 train scenes (seed 0) at 128 px; re-measure with
# `python -m sgma.data.synthetic` after changing the generator (tests/test_synthetic.py checks them).
MODALITIES: dict[str, Modality] = {
    "rgb": Modality("rgb", 3, (0.355, 0.363, 0.304), (0.2, 0.18, 0.196), "optical", 1.0),  # reflectance
    "nir": Modality("nir", 1, (0.305,), (0.135,), "optical", 1.0),  # reflectance
    "dsm": Modality("dsm", 1, (4.43,), (5.71,), "elevation"),  # metres
    "sar": Modality("sar", 1, (-14.2,), (6.84,), "sar"),  # dB
}
DEFAULT_MODALITIES = ("rgb", "nir", "dsm")
SPLITS = ("train", "val", "test")
GSD = 0.5  # metres per pixel, fixed: a larger image_size shows a larger area, not a finer one

# onto-masks: which classes an object may paint over (top view: later objects occlude earlier ones)
_ONTO_GROUND = np.array([True, False, True, False, False, False])
_ONTO_LAWN = np.array([False, False, True, False, False, False])
_ONTO_TREE = np.array([True, False, True, True, False, False])
_ONTO_ROAD = np.array([True, False, False, False, False, False])

_VEG_RGB = np.array([0.30, 0.44, 0.20], np.float32)
_DRY_RGB = np.array([0.44, 0.45, 0.2], np.float32)
_TREE_RGB = np.array([0.2, 0.31, 0.14], np.float32)
_CAR_PAINTS = np.array(
    [
        [0.75, 0.08, 0.08],  # red
        [0.10, 0.18, 0.62],  # blue
        [0.85, 0.72, 0.08],  # yellow
        [0.92, 0.92, 0.92],  # white
        [0.06, 0.06, 0.08],  # black
        [0.08, 0.45, 0.50],  # teal
        [0.55, 0.10, 0.45],  # purple
    ],
    np.float32,
)
_CAR_PAINT_P = np.array([0.22, 0.2, 0.1, 0.18, 0.12, 0.1, 0.08])


# ---------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in metres, origin at the scene centre (x right, y down). Read-only."""
    c = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * GSD
    x, y = np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))
    return x, y


@functools.lru_cache(maxsize=32)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation matrix: a coarse n_in grid stretched over n_out pixels."""
    pos = (np.arange(n_out) + 0.5) / n_out * (n_in - 1)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    w = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - w
    m[np.arange(n_out), i0 + 1] = w
    m.flags.writeable = False
    return m


def _smooth_field(rng: np.random.Generator, size: int, cell_px: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise with features about ``cell_px`` pixels wide (two matmuls)."""
    n = max(2, math.ceil(size / cell_px) + 1)
    m = _interp_matrix(size, n)
    return (m @ rng.standard_normal((n, n), dtype=np.float32) @ m.T) * np.float32(1.4)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[y, x] = a[y - dy, x - dx]``, zero where that falls outside."""
    out = np.zeros_like(a)
    h, w = a.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


@dataclass
class _Layout:
    """One scene's geometry and per-object material table; modalities are rendered from it."""

    size: int
    rng: np.random.Generator
    cls: np.ndarray = field(init=False)  # uint8 class ids
    obj: np.ndarray = field(init=False)  # int32 index into the material table
    elev: np.ndarray = field(init=False)  # float32 height above ground (m)
    shade: np.ndarray = field(init=False)  # float32 roof-facet illumination factor (pitched roofs)
    materials: list = field(default_factory=list)  # chunks of (n, 6): r, g, b, nir, texture amp, sar dB
    count: int = 0  # materials so far
    lanes: list = field(default_factory=list)  # (road pixels, along, across, lane offset, car density)
    shadow: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = self.size
        self.cls = np.full((s, s), LOW_VEGETATION, np.uint8)
        self.obj = np.zeros((s, s), np.int32)
        self.elev = np.zeros((s, s), np.float32)
        self.shade = np.ones((s, s), np.float32)
        self.half = s * GSD / 2  # half the scene side, metres

    def material(self, rgb, nir, amp, sar) -> int:
        """Register one material, or n at once (rgb (n, 3), the others (n,)); return the first id."""
        rgb = np.atleast_2d(np.asarray(rgb, np.float32))
        n = len(rgb)
        chunk = np.empty((n, 6), np.float32)
        chunk[:, :3] = rgb
        chunk[:, 3], chunk[:, 4], chunk[:, 5] = nir, amp, sar
        self.materials.append(chunk)
        self.count += n
        return self.count - n

    def table(self) -> np.ndarray:
        """(6, n_materials) float32: rows r, g, b, nir, texture amplitude, sar."""
        if not hasattr(self, "_table"):
            self._table = np.ascontiguousarray(np.concatenate(self.materials).T)
        return self._table

    def frame(self, cx: float, cy: float, angle: float, radius: float):
        """Bounding-box slices and local (u along ``angle``, v across) coordinates around a centre."""
        s, r = self.size, radius / GSD + 1
        px, py = cx / GSD + s / 2, cy / GSD + s / 2
        x0, x1 = max(int(px - r), 0), min(int(px + r) + 1, s)
        y0, y1 = max(int(py - r), 0), min(int(py + r) + 1, s)
        if x0 >= x1 or y0 >= y1:
            return None
        axis = _grid(s)[0][0]
        xs, ys = axis[x0:x1] - np.float32(cx), axis[y0:y1] - np.float32(cy)
        c, si = math.cos(angle), math.sin(angle)
        u = xs[None, :] * c + ys[:, None] * si
        v = ys[:, None] * c - xs[None, :] * si
        return (slice(y0, y1), slice(x0, x1)), u, v

    def paint(self, sl, mask, cls_id: int, obj_id, onto: np.ndarray, elev=None) -> np.ndarray:
        m = mask & onto[self.cls[sl]]
        self.cls[sl][m] = cls_id
        self.obj[sl][m] = obj_id if np.isscalar(obj_id) else obj_id[m]
        if elev is not None:
            self.elev[sl][m] = elev if np.isscalar(elev) else elev[m]
        return m


def _pavement_rgb(rng: np.random.Generator, lo: float = 0.26, hi: float = 0.62) -> np.ndarray:
    """Grey pavement colour; about half of all roofs are drawn from this very distribution."""
    return rng.uniform(lo, hi) * (1 + rng.normal(0, 0.04, 3)) + np.array([0, 0, 0.01])


def _roof_material(lay: _Layout) -> int:
    rng = lay.rng
    kind = rng.choice(6, p=[0.36, 0.32, 0.1, 0.13, 0.05, 0.04])
    nir = rng.uniform(0.1, 0.34)
    if kind == 0:  # grey (concrete, bitumen): same colours as roads
        rgb = _pavement_rgb(rng)
    elif kind == 1:  # red/orange tiles
        rgb = np.array([0.58, 0.29, 0.21]) * rng.uniform(0.8, 1.15) + rng.normal(0, 0.03, 3)
    elif kind == 2:  # dark
        rgb = _pavement_rgb(rng, 0.12, 0.26)
    elif kind == 3:  # bright
        rgb = _pavement_rgb(rng, 0.68, 0.9)
    elif kind == 4:  # green roof: vegetation in rgb and nir, building in dsm
        rgb, nir = _VEG_RGB * rng.uniform(0.8, 1.1), rng.uniform(0.4, 0.55)
    else:  # painted metal
        rgb = np.array([0.25, 0.35, 0.5]) * rng.uniform(0.8, 1.2)
    return lay.material(np.clip(rgb, 0.03, 0.95), nir, 0.05, rng.normal(-9, 3.5))


# --------------------------------------------------------------------------------------------- layout
def _roads(lay: _Layout, theta: float) -> list[tuple[float, float, int, float]]:
    """Road grid rotated by ``theta``: asphalt and sidewalks; lanes are queued for cars (added after trees).

    Returns the roads as (offset across, half width, axis, sidewalk width), metres in the grid frame.
    """
    rng, (x, y) = lay.rng, _grid(lay.size)
    c, s = math.cos(theta), math.sin(theta)
    coords = (x * c + y * s, y * c - x * s)  # (u, v); a road of axis 0 runs along u at a fixed v
    reach = lay.half * 1.42
    roads = []
    for axis in (0, 1):
        spacing = rng.uniform(45, 90)
        for off in np.arange(rng.uniform(-reach, -reach + spacing), reach, spacing):
            if rng.random() < 0.15:
                continue
            sidewalk = rng.uniform(1.0, 3.0) * (rng.random() < 0.7)
            roads.append((float(off), rng.uniform(3.5, 6.5), axis, sidewalk))
    sidewalk_id = lay.material(_pavement_rgb(rng, 0.45, 0.68), rng.uniform(0.2, 0.32), 0.04, rng.normal(-15, 2))
    dist = [np.abs(coords[1 - axis] - off) for off, _, axis, _ in roads]
    for d, (_, w, _, sw) in zip(dist, roads, strict=True):  # sidewalks first: asphalt wins at crossings
        if sw > 0:
            lay.paint(np.s_[:, :], d < w + sw, IMPERVIOUS, sidewalk_id, _ONTO_LAWN)
    for d, (off, w, axis, _) in zip(dist, roads, strict=True):
        asphalt = lay.material(_pavement_rgb(rng, 0.24, 0.5), rng.uniform(0.12, 0.28), 0.06, rng.normal(-17, 2))
        pix = np.nonzero(d < w)
        lay.cls[pix], lay.obj[pix] = IMPERVIOUS, asphalt
        along, across = coords[axis][pix], coords[1 - axis][pix] - off
        parked = rng.uniform(0.1, 0.5)
        for lane, density in ((-w + 1.2, parked), (w - 1.2, parked), (-w / 2, 0.03), (w / 2, 0.03)):
            if density < 0.1 or rng.random() < 0.6:
                lay.lanes.append((pix, along, across, lane, density))
    return roads


def _blocks(lay: _Layout, roads, axis: int) -> list[tuple[float, float]]:
    """Free intervals between the roads of one axis (across them), within the scene's reach."""
    reach = lay.half * 1.42
    edges = sorted((off - w - sw, off + w + sw) for off, w, ax, sw in roads if ax == axis)
    lo, out = -reach, []
    for a, b in [*edges, (reach, reach)]:
        if a - lo > 6:
            out.append((lo, a))
        lo = max(lo, b)
    return out


def _parcels(lay: _Layout, theta: float, roads) -> list:
    """Split each block into parcels; most get one building, some a parking lot or a green yard.

    Buildings: rectangles and L-shapes of many sizes and aspect ratios, flat or pitched, mostly aligned
    with the street grid, some rotated. Returns the parking lots (cars are added after trees).
    """
    rng = lay.rng
    c, s = math.cos(theta), math.sin(theta)
    yard_id = lay.material(_pavement_rgb(rng, 0.35, 0.65), rng.uniform(0.15, 0.3), 0.05, rng.normal(-15, 2))
    p_building = rng.uniform(0.7, 0.95)
    lots = []
    for v0, v1 in _blocks(lay, roads, 0):
        rows = [(v0, v1)] if v1 - v0 < 32 else [(v0, (v0 + v1) / 2), ((v0 + v1) / 2, v1)]
        for u0, u1 in _blocks(lay, roads, 1):
            for r0, r1 in rows:
                cuts = np.cumsum(rng.uniform(10, 34, int((u1 - u0) / 10) + 1)) + u0
                cuts = [u0, *cuts[cuts < u1 - 8].tolist(), u1]
                for p0, p1 in itertools.pairwise(cuts):
                    hu, hv = (p1 - p0) / 2 - 1, (r1 - r0) / 2 - 1  # 1 m setback all round
                    cu, cv = (p0 + p1) / 2, (r0 + r1) / 2
                    if min(hu, hv) < 2.5:
                        continue
                    fr = lay.frame(cu * c - cv * s, cu * s + cv * c, theta, math.hypot(hu, hv) + 1)
                    if fr is None:
                        continue
                    kind = rng.random()
                    if kind < p_building:
                        _building(lay, fr, hu, hv, theta, yard_id)
                    elif kind < p_building + 0.12 and hu > 5 and hv > 5:
                        sl, u, v = fr
                        lot = lay.material(
                            _pavement_rgb(rng, 0.24, 0.55), rng.uniform(0.12, 0.28), 0.06, rng.normal(-17, 2)
                        )
                        lay.paint(sl, (np.abs(u) < hu) & (np.abs(v) < hv), IMPERVIOUS, lot, _ONTO_LAWN)
                        lots.append((sl, u, v, hu, hv))
    return lots


def _building(lay: _Layout, fr, hu: float, hv: float, theta: float, yard_id: int) -> None:
    rng = lay.rng
    sl, u, v = fr
    a, b = hu * rng.uniform(0.7, 1.0), hv * rng.uniform(0.7, 1.0)
    du, dv = rng.uniform(-1, 1) * (hu - a), rng.uniform(-1, 1) * (hv - b)  # position within the parcel
    phi = rng.normal(0, 0.03)
    if rng.random() < 0.2:  # off-grid orientation, shrunk to stay inside the parcel
        phi = rng.uniform(-np.pi / 2, np.pi / 2)
        cp, sp = abs(math.cos(phi)), abs(math.sin(phi))
        k = min(1.0, hu / (a * cp + b * sp), hv / (a * sp + b * cp))
        a, b, du, dv = a * k, b * k, 0.0, 0.0
    cp, sp = math.cos(phi), math.sin(phi)
    bu = (u - du) * cp + (v - dv) * sp  # building frame
    bv = (v - dv) * cp - (u - du) * sp
    if b > a:  # ridge along the long side
        a, b, bu, bv = b, a, bv, -bu
    au, av = np.abs(bu), np.abs(bv)
    foot = (au < a) & (av < b)
    lshape = rng.random() < 0.3 and b > 4
    if lshape:
        ca, cb = rng.uniform(0.35, 0.7, 2)
        su, sv = rng.choice((-1, 1), 2)
        foot &= ~((su * bu > a * (1 - 2 * ca)) & (sv * bv > b * (1 - 2 * cb)))
    house = a * b < 60
    height = rng.uniform(3, 10) if house else rng.uniform(6, 20)
    pitched = not lshape and rng.random() < 0.55
    elev = height + rng.uniform(1.0, 3.5) * (1 - av / b) if pitched else np.float32(height)
    if rng.random() < 0.03:  # built after the DSM survey: absent from the DSM (cross-modal conflict)
        elev = np.float32(0.0)
    if rng.random() < 0.2:  # paved yard / driveway in the parcel
        lay.paint(sl, (np.abs(u) < hu) & (np.abs(v) < hv) & (u > 0), IMPERVIOUS, yard_id, _ONTO_LAWN)
    m = lay.paint(sl, foot, BUILDING, _roof_material(lay), _ONTO_LAWN, elev=elev)
    if pitched:  # the two roof facets face the sun differently
        bright = np.float32(rng.choice((1.13, 0.87)))
        lay.shade[sl][m] = np.where(bv[m] > 0, bright, 2 - bright)


def _lane_cars(lay: _Layout, pix, along, across, lane: float, density: float) -> None:
    """Cars in one lane, vectorised over the road's pixels with a sorted-interval lookup."""
    rng = lay.rng
    reach = lay.half * 1.42
    n = int(2 * reach / 4.5) + 2
    length = rng.uniform(3.8, 5.2, n)
    gap = np.where(rng.random(n) < density, rng.uniform(0.6, 2.0, n), rng.uniform(4, 25, n))
    start = -reach + np.cumsum(length + gap) - length
    width = rng.uniform(1.7, 2.0, n)
    first = _car_materials(lay, n)
    band = np.abs(across - lane) < 1.0
    a = along[band]
    k = np.clip(np.searchsorted(start, a) - 1, 0, n - 1)
    inside = (a >= start[k]) & (a < start[k] + length[k]) & (np.abs(across[band] - lane) < width[k] / 2)
    rows, cols = pix[0][band][inside], pix[1][band][inside]
    ok = _ONTO_ROAD[lay.cls[rows, cols]]
    rows, cols = rows[ok], cols[ok]
    lay.cls[rows, cols] = CAR
    lay.obj[rows, cols] = first + k[inside][ok]
    lay.elev[rows, cols] = 1.5


def _car_materials(lay: _Layout, n: int) -> int:
    rng = lay.rng
    paints = _CAR_PAINTS[rng.choice(len(_CAR_PAINTS), n, p=_CAR_PAINT_P)] * rng.uniform(0.85, 1.1, (n, 1))
    return lay.material(np.clip(paints, 0.02, 0.97), rng.uniform(0.08, 0.45, n), 0.03, rng.normal(-6, 3, n))


def _lot_cars(lay: _Layout, lot) -> None:
    """Two rows of parked cars across a parking lot (car long axis along v)."""
    rng = lay.rng
    sl, u, v, hu, hv = lot
    pitch = 2.6
    n_slots = int(2 * hu / pitch)
    if n_slots < 1:
        return
    slot = np.floor((u + hu) / pitch)
    valid = (slot >= 0) & (slot < n_slots)
    slot = np.clip(slot, 0, n_slots - 1).astype(np.int64)
    row = (v > 0).astype(np.int64)
    occupied = rng.random((2, n_slots)) < rng.uniform(0.15, 0.7)
    ids = _car_materials(lay, 2 * n_slots) + row * n_slots + slot
    du = u + hu - (slot + 0.5) * pitch
    dv = np.abs(v) - hv / 2
    m = valid & (np.abs(du) < 0.9) & (np.abs(dv) < 2.3) & occupied[row, slot]
    lay.paint(sl, m, CAR, ids, _ONTO_ROAD, elev=1.5)


def _pixel_xy(lay: _Layout, p: int) -> tuple[float, float]:
    """Scene coordinates (metres) of flat pixel index ``p``, jittered within the pixel."""
    jitter = lay.rng.uniform(-0.5, 0.5, 2)
    return (
        float((p % lay.size + 0.5 + jitter[0] - lay.size / 2) * GSD),
        float((p // lay.size + 0.5 + jitter[1] - lay.size / 2) * GSD),
    )


def _trees(lay: _Layout) -> None:
    """Clusters of discs (crowns), mostly on lawn, some overhanging pavement; never over buildings."""
    rng = lay.rng
    target = rng.uniform(0.09, 0.22) * lay.size**2
    lawn = np.flatnonzero(lay.cls == LOW_VEGETATION)
    ground = np.flatnonzero(_ONTO_GROUND[lay.cls])
    covered = 0
    for _ in range(int(30 * lay.size**2 / 128**2) + 5):
        if covered >= target or ground.size == 0:
            break
        pool = lawn if lawn.size and rng.random() < 0.85 else ground
        cx, cy = _pixel_xy(lay, pool[rng.integers(pool.size)])
        n = 1 + rng.poisson(3.0)
        r = rng.uniform(1.5, 4.5, n)[:, None, None]
        offsets = rng.normal(0, 3.0, (2, n))
        heights = rng.uniform(3, 15) * rng.uniform(0.75, 1.0, n)[:, None, None]
        smooth = rng.uniform(0.1, 0.32)  # crown texture: rgb grain and dsm roughness
        mat = lay.material(
            _TREE_RGB * rng.uniform(0.85, 1.3) + rng.normal(0, 0.015, 3),
            rng.uniform(0.36, 0.55),
            smooth,
            rng.normal(-10, 1.5),
        )
        reach = float(np.max(np.abs(offsets)) + r.max())
        fr = lay.frame(cx, cy, 0.0, reach)
        if fr is None:
            continue
        sl, u, v = fr
        du, dv = u[None] - offsets[0][:, None, None], v[None] - offsets[1][:, None, None]
        q = 1 - (du * du + dv * dv) / (r * r)  # (n, h, w) > 0 inside each crown
        h = (heights * (0.6 + 0.4 * np.sqrt(np.maximum(q, 0))) * (q > 0)).max(0)
        crown = h > 0
        covered += np.count_nonzero(crown & _ONTO_GROUND[lay.cls[sl]])
        lay.paint(sl, crown, TREE, mat, _ONTO_TREE, elev=np.maximum(h, lay.elev[sl]).astype(np.float32))


def _clutter(lay: _Layout) -> None:
    rng = lay.rng
    for _ in range(rng.poisson(9 * lay.size**2 / 128**2)):
        cx, cy = rng.uniform(-lay.half, lay.half, 2)
        a, b = rng.uniform(1.0, 4.0), rng.uniform(0.8, 2.5)
        fr = lay.frame(cx, cy, rng.uniform(0, np.pi), math.hypot(a, b))
        if fr is None:
            continue
        sl, u, v = fr
        box = rng.random() < 0.5  # containers, pallets vs. piles, bins
        shape = (np.abs(u) < a) & (np.abs(v) < b) if box else (u / a) ** 2 + (v / b) ** 2 < 1
        mat = lay.material(rng.uniform(0.1, 0.85, 3), rng.uniform(0.1, 0.45), 0.15, rng.normal(-10, 4))
        lay.paint(sl, shape, CLUTTER, mat, _ONTO_GROUND, elev=np.float32(rng.uniform(0.2, 2.5)))


def _shadows(lay: _Layout) -> None:
    """Cast shadows: a pixel is shaded if the ray towards the sun passes below a taller object."""
    rng = lay.rng
    azimuth, k = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.85)  # k = shadow length / height
    top = float(lay.elev.max())
    lay.shadow = np.zeros(lay.cls.shape, bool)
    if top <= 0:
        return
    reach = top * k / GSD  # pixels
    dy, dx = math.sin(azimuth), math.cos(azimuth)
    for s in np.linspace(1.0, reach, int(min(max(reach / 1.5, 1), 14))):
        src = _shift(lay.elev, round(s * dy), round(s * dx))
        lay.shadow |= src - np.float32(s * GSD / k) > lay.elev + np.float32(0.3)


def _layout(rng: np.random.Generator, size: int) -> _Layout:
    lay = _Layout(size, rng)
    lawn_b = lay.material(_DRY_RGB * rng.uniform(0.85, 1.1), rng.uniform(0.36, 0.5), 0.12, -13.0)
    lawn_a = lay.material(_VEG_RGB * rng.uniform(0.75, 1.2), rng.uniform(0.4, 0.58), 0.1, -12.5)
    patches = _smooth_field(rng, size, 40 / GSD) > rng.uniform(0.5, 1.5)
    lay.obj[:] = np.where(patches, lawn_b, lawn_a)
    theta = rng.uniform(0, np.pi)
    lots = _parcels(lay, theta, _roads(lay, theta))
    _trees(lay)
    for lane in lay.lanes:
        _lane_cars(lay, *lane)
    for lot in lots:
        _lot_cars(lay, lot)
    _clutter(lay)
    _shadows(lay)
    return lay


# ----------------------------------------------------------------------------------------- modalities
def _blur(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur (edges replicated): white noise -> ~2 px grain."""
    p = np.pad(x, 1, mode="edge")
    p = p[:-2] + 2 * p[1:-1] + p[2:]
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * np.float32(1 / 16)


class _Renderer:
    """Renders the requested modalities of one layout; each field has its own seeded stream."""

    def __init__(self, seed: int, index: int, lay: _Layout) -> None:
        self.seed, self.index, self.lay = seed, index, lay
        self.table = lay.table()
        self._tex: np.ndarray | None = None

    def rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.index, stream))

    @property
    def texture(self) -> np.ndarray:
        """Per-pixel surface texture shared by rgb and nir (crowns, grass, asphalt grain)."""
        if self._tex is None:
            size = self.lay.size
            noise = self.rng(10).standard_normal((size, size), dtype=np.float32)
            self._tex = (noise * 0.35 + _blur(noise) * 1.6) * self.table[4][self.lay.obj]
        return self._tex

    def rgb(self) -> np.ndarray:
        lay, rng = self.lay, self.rng(1)
        light = 1 + 0.07 * _smooth_field(rng, lay.size, 30 / GSD)
        gain = light * lay.shade * (1 + self.texture)
        img = self.table[:3][:, lay.obj] * gain[None]
        # cast shadow: only blue-ish diffuse skylight, dark and nearly colourless, so shaded lawn and
        # shaded pavement look alike (nir, dominated by leaf scattering, keeps most of its contrast)
        shaded = img[:, lay.shadow]
        lum = shaded.mean(0, keepdims=True)
        tint = np.array([0.3, 0.32, 0.42], np.float32)[:, None] * np.float32(rng.uniform(0.8, 1.2))
        img[:, lay.shadow] = (lum + np.float32(0.2) * (shaded - lum)) * tint
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(0.02)
        return np.clip(img, 0.0, 1.0, out=img)

    def nir(self) -> np.ndarray:
        lay, rng = self.lay, self.rng(2)
        img = self.table[3][lay.obj] * (1 + 0.6 * self.texture)
        img[lay.shadow] *= np.float32(0.78)
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(0.03)
        return np.clip(img, 0.0, 1.0, out=img)[None]

    def dsm(self) -> np.ndarray:
        lay, rng = self.lay, self.rng(3)
        size = lay.size
        x, y = _grid(size)
        gx, gy = rng.normal(0, 0.02, 2).astype(np.float32)  # gentle slope, metres per metre
        h = x * gx + y * gy + 0.6 * _smooth_field(rng, size, 25 / GSD)
        h += _blur(_blur(lay.elev))  # photogrammetric DSMs are smooth across edges
        noise = rng.standard_normal((2, size, size), dtype=np.float32)
        tree, roof = lay.cls == TREE, lay.cls == BUILDING
        rough = self.table[4][lay.obj] * (_blur(noise[0]) * np.float32(6.0) + noise[0] * np.float32(0.8))
        h[tree] += rough[tree]  # crown roughness follows the crown's rgb texture
        bumps = np.maximum(_smooth_field(rng, size, 3 / GSD) - 1.2, 0) * np.float32(2.5)
        h[roof] += bumps[roof]  # roof structures (AC units, chimneys, dormers)
        shrubs = np.maximum(_smooth_field(rng, size, 4 / GSD) - 1.0, 0) * np.float32(1.5)
        lawn = lay.cls == LOW_VEGETATION
        h[lawn] += shrubs[lawn]  # low vegetation includes shrubs and hedges
        h += noise[1] * np.float32(0.2)
        spikes = rng.integers(0, size * size, rng.poisson(size * size * 3e-4))
        h.flat[spikes] += rng.uniform(5, 40, spikes.size).astype(np.float32)
        return h[None]

    def sar(self) -> np.ndarray:
        """Backscatter in dB at half resolution with single-look speckle: weak, noisy, edge-bright."""
        lay, rng = self.lay, self.rng(4)
        size = lay.size
        linear = np.float32(10) ** (self.table[5][lay.obj] / np.float32(10))
        bld = lay.cls == BUILDING
        bounce = (_shift(bld, 0, 1) | _shift(bld, 0, 2)) & ~bld  # double bounce at walls facing the radar
        linear[bounce] *= np.float32(6)
        half = (size + 1) // 2
        pad = np.pad(linear, ((0, 2 * half - size), (0, 2 * half - size)), mode="edge")
        coarse = pad.reshape(half, 2, half, 2).mean((1, 3))
        coarse *= rng.standard_exponential((half, half), dtype=np.float32)
        full = np.repeat(np.repeat(coarse, 2, 0), 2, 1)[:size, :size]
        return (10 * np.log10(np.maximum(full, np.float32(1e-4))))[None]


def render_scene(
    seed: int, index: int, size: int, modalities: Sequence[str] = DEFAULT_MODALITIES
) -> dict[str, np.ndarray]:
    """Render one scene: ``{name: float32 (C, size, size)}`` per requested modality plus ``"mask"``.

    Deterministic from ``(seed, index, size)``; the layout and each modality use separate random streams,
    so a modality's values do not depend on which other modalities were requested. ``mask`` is uint8
    (size, size) with class ids 0..5 (no ignore pixels).
    """
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    names = parse_pattern(modalities, tuple(MODALITIES)) if len(modalities) else ()  # () -> mask only
    lay = _layout(np.random.default_rng((int(seed), int(index), 0)), int(size))
    renderer = _Renderer(int(seed), int(index), lay)
    out = {name: getattr(renderer, name)() for name in names}
    out["mask"] = lay.cls
    return out


class SyntheticScenes(torch.utils.data.Dataset):
    """Raw (un-normalised) synthetic samples: each modality float32 (C, H, W), ``"mask"`` int64 (H, W).

    Splits are disjoint streams: scene ``i`` of split ``s`` with seed ``seed`` is scene ``i`` of the
    generator stream ``seed * 3 + SPLITS.index(s)``, so no (seed, split) pair ever repeats another's scenes.
    With ``fresh_scenes`` (train only) sample ``i`` of epoch ``e`` is scene ``e * num_samples + i``: every
    epoch brings new scenes, as an unlimited stream of data; otherwise the split is a fixed set of scenes,
    like a real dataset.
    """

    classes = CLASSES
    palette = PALETTE

    def __init__(
        self,
        split: str = "train",
        *,
        num_samples: int,
        image_size: int = 128,
        seed: int = 0,
        modalities: Sequence[str] | str = DEFAULT_MODALITIES,
        fresh_scenes: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if num_samples < 1:
            raise ValueError(f"dataset.splits.{split}.num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.split = split
        self.num_samples = int(num_samples)
        self.image_size = check_crop_size(image_size)  # image_size is dataset.size
        self.seed = int(seed)
        names = parse_pattern(modalities, tuple(MODALITIES))
        self.modalities: tuple[Modality, ...] = tuple(MODALITIES[n] for n in names)
        self.stream = self.seed * len(SPLITS) + SPLITS.index(split)
        self.fresh_scenes = bool(fresh_scenes) and split == "train"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def crop_size(self) -> int:
        """Side of a sample (the whole scene)."""
        return self.image_size

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sample(i)

    def sample(
        self, i: int, epoch: int = 0, window: int | None = None, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Sample ``i`` of epoch ``epoch``: the modalities ``names`` (default: all) and ``mask``. A ``window``
        other than the scene size reads a random window of that side (its position a function of (seed, epoch,
        i)), clipped to the scene where it is larger (:mod:`sgma.data.augment` resizes, then pads)."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        i %= self.num_samples
        names = [m.name for m in self.modalities] if names is None else list(names)
        scene_index = epoch * self.num_samples + i if self.fresh_scenes else i
        scene = render_scene(self.stream, scene_index, self.image_size, names)
        scene["mask"] = scene["mask"].astype(np.int64)
        if window is not None and window != self.image_size:
            size = self.image_size
            win = random_window({"scene": (size, size)}, window, self.seed, i, epoch)
            scene = {key: read_window(value, win.y, win.x, window, fill=None) for key, value in scene.items()}
        sample = {name: torch.from_numpy(scene[name]) for name in names}
        sample["mask"] = torch.from_numpy(scene["mask"])
        return sample

    def __repr__(self) -> str:
        pattern = format_pattern([m.name for m in self.modalities])
        return (
            f"SyntheticScenes(split={self.split!r}, num_samples={self.num_samples}, "
            f"image_size={self.image_size}, seed={self.seed}, modalities={pattern!r}, fresh_scenes={self.fresh_scenes})"
        )


# ----------------------------------------------------------------------------------------- diagnostics
def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """k x k box mean with edge padding (summed-area table), for (..., H, W) arrays."""
    p = k // 2
    pad = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(p + 1, p), (p + 1, p)], mode="edge").astype(np.float64)
    pad[..., 0, :] = 0
    pad[..., :, 0] = 0
    c = pad.cumsum(-1).cumsum(-2)
    s = c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]
    return (s / (k * k)).astype(np.float32)


def pixel_features(scene: dict[str, np.ndarray], names: Sequence[str], k: int = 5) -> np.ndarray:
    """(H*W, 3*C) per-pixel features: normalised value, k x k local mean and log local std per channel."""
    feats = []
    for name in names:
        mod = MODALITIES[name]
        x = np.asarray(scene[name], np.float32)
        x = (x - np.array(mod.mean, np.float32)[:, None, None]) / np.array(mod.std, np.float32)[:, None, None]
        mean = _box_mean(x, k)
        std = np.sqrt(np.maximum(_box_mean(x * x, k) - mean * mean, 0) + 1e-4)
        feats += [x, mean, np.log(std)]
    return np.concatenate(feats, 0).reshape(-1, x.shape[-1] * x.shape[-2]).T


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 12) -> np.ndarray:
    centres = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        label = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([x[label == j].mean(0) if np.any(label == j) else centres[j] for j in range(k)])
    return label


def _fit_gaussians(x: np.ndarray, y: np.ndarray, num_classes: int, components: int = 4, reg: float = 1e-2):
    """A small Gaussian mixture per class (k-means split, then full covariances): multimodal classes
    (red, grey and white roofs; cars of several paints) are not forced into one ellipsoid."""
    rng = np.random.default_rng(0)
    comps = []
    dim = x.shape[1]
    for c in range(num_classes):
        xc = x[y == c]
        if len(xc) < 2 * dim:
            continue
        k = min(components, len(xc) // (4 * dim)) or 1
        label = _kmeans(xc, k, rng) if k > 1 else np.zeros(len(xc), np.int64)
        for j in range(k):
            xj = xc[label == j]
            if len(xj) < dim + 2:
                continue
            cov = np.cov(xj, rowvar=False).reshape(dim, dim) + reg * np.eye(dim)
            logdet = np.linalg.slogdet(cov)[1]
            comps.append((c, xj.mean(0), np.linalg.inv(cov), logdet, math.log(len(xj) / len(x))))
    return comps


def _predict_gaussians(comps, x: np.ndarray) -> np.ndarray:
    scores = np.empty((len(comps), len(x)))
    for i, (_, mu, icov, logdet, logprior) in enumerate(comps):
        d = x - mu
        scores[i] = -0.5 * np.einsum("ij,jk,ik->i", d, icov, d) - 0.5 * logdet + logprior
    return np.array([c for c, *_ in comps])[scores.argmax(0)]


def modality_probe(
    patterns: Sequence[str],
    *,
    train: int = 12,
    test: int = 8,
    size: int = 128,
    seed: int = 0,
    modalities: Sequence[str] = ("rgb", "nir", "dsm", "sar"),
) -> dict[str, np.ndarray]:
    """How informative is each modality pattern? A per-pixel Gaussian-mixture classifier on
    :func:`pixel_features`, fitted on ``train`` scenes and scored on ``test`` other scenes.

    Returns ``{pattern: confusion matrix (K, K)}`` (rows = truth). A diagnostic of the generator,
    not a baseline: it shows which class pairs each modality can separate.
    """
    names = parse_pattern(list(modalities), tuple(MODALITIES))
    scenes = [render_scene(seed, i, size, names) for i in range(train + test)]
    rng = np.random.default_rng(seed)
    k = len(CLASSES)
    out = {}
    for pattern in patterns:
        pnames = parse_pattern(pattern, names)
        feats = [pixel_features(s, pnames) for s in scenes]
        labels = [s["mask"].reshape(-1) for s in scenes]
        x, y = np.concatenate(feats[:train]), np.concatenate(labels[:train])
        keep = rng.random(len(y)) < min(1.0, 60_000 / len(y))
        comps = _fit_gaussians(x[keep].astype(np.float64), y[keep], k)
        pred = _predict_gaussians(comps, np.concatenate(feats[train:]).astype(np.float64))
        truth = np.concatenate(labels[train:])
        out[format_pattern(pnames)] = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
    return out


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    tp = np.diag(confusion).astype(np.float64)
    denom = confusion.sum(0) + confusion.sum(1) - tp
    return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def pair_confusion(confusion: np.ndarray, a: int, b: int) -> float:
    """Fraction of a/b pixels predicted as the other one, among those predicted as a or b."""
    within = confusion[a, a] + confusion[b, b] + confusion[a, b] + confusion[b, a]
    return float((confusion[a, b] + confusion[b, a]) / max(within, 1))


def measure_stats(num: int = 200, size: int = 128, seed: int = 0) -> dict[str, tuple[list, list]]:
    """Per-channel mean/std of the raw generator output over ``num`` training scenes."""
    stream = seed * len(SPLITS) + SPLITS.index("train")
    acc = {n: [0.0, 0.0, 0] for n in MODALITIES}
    for i in range(num):
        scene = render_scene(stream, i, size, tuple(MODALITIES))
        for n in MODALITIES:
            x = scene[n].reshape(scene[n].shape[0], -1).astype(np.float64)
            acc[n][0] += x.sum(1)
            acc[n][1] += (x * x).sum(1)
            acc[n][2] += x.shape[1]
    stats = {}
    for n, (s, ss, c) in acc.items():
        mean = s / c
        stats[n] = (mean.tolist(), np.sqrt(ss / c - mean * mean).tolist())
    return stats


def _main() -> None:
    for size in (128, 256, 512):
        n = {128: 200, 256: 50, 512: 12}[size]
        render_scene(0, 10_000, size, DEFAULT_MODALITIES)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            render_scene(0, i, size, DEFAULT_MODALITIES)
        wall, cpu = (time.perf_counter() - t0) / n * 1e3, (time.process_time() - c0) / n * 1e3
        print(f"{size} px, rgb+nir+dsm: {wall:.2f} ms/scene wall, {cpu:.2f} ms/scene cpu")
    counts = np.zeros(len(CLASSES))
    for i in range(200):
        counts += np.bincount(render_scene(0, i, 128, ())["mask"].ravel(), minlength=len(CLASSES))
    print("class frequencies (200 scenes, 128 px):")
    for name, f in zip(CLASSES, counts / counts.sum(), strict=True):
        print(f"  {name:20s} {100 * f:5.1f} %")
    print("mean/std (200 train scenes, 128 px):")
    for n, (mean, std) in measure_stats().items():
        print(f"  {n}: mean={tuple(round(m, 4) for m in mean)} std={tuple(round(s, 4) for s in std)}")
    patterns = ["rgb", "nir", "dsm", "sar", "rgb+nir", "rgb+dsm", "nir+dsm", "rgb+nir+dsm", "rgb+nir+dsm+sar"]
    print("per-pixel Gaussian-mixture probe (12 train / 8 test scenes): mIoU | IoU per class | pair confusion")
    for pattern, conf in modality_probe(patterns).items():
        iou = iou_per_class(conf)
        print(
            f"  {pattern:16s} mIoU={100 * np.nanmean(iou):5.1f}  "
            + " ".join(f"{100 * v:5.1f}" for v in iou)
            + f"  road/roof={pair_confusion(conf, IMPERVIOUS, BUILDING):.2f}"
            + f" tree/lawn={pair_confusion(conf, TREE, LOW_VEGETATION):.2f}"
        )


if __name__ == "__main__":
    _main()
