"""Deterministic procedural renderer for the synthetic world.

Every image is a pure function of a numpy ``Generator``: textured shapes composited on textured backgrounds,
with the *visible* binary mask, tight box and class of each object returned alongside the pixels, so that
every annotation format (boxes, COCO polygons, VOC / DAVIS masks, NYUD depth maps) is derived from the same
ground truth.

Object classes differ by shape *and* by texture / colour statistics, so a small CNN can learn them from
64 px crops; backgrounds use a separate, muted palette so that objects stand out from context. Noise used
in textures is an integer hash of object-relative coordinates, so an object keeps its appearance when it
moves (DAVIS) and nothing depends on platform floating-point rounding of random streams.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[float, float, float]


def _hex(code: str) -> RGB:
    return tuple(int(code[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


@dataclass(frozen=True)
class ObjectClass:
    """One catalogue entry: a shape with a characteristic texture mixing two characteristic colours."""

    name: str
    shape: str
    texture: str
    param: tuple[float, ...]
    colors: tuple[RGB, RGB]


# 20 classes so that the 20 VOC names can map one-to-one onto the catalogue.
CATALOGUE: tuple[ObjectClass, ...] = (
    ObjectClass("circle", "circle", "stripes", (30.0, 0.55), (_hex("d62728"), _hex("ffdd33"))),
    ObjectClass("square", "square", "checker", (0.5, 0.0), (_hex("1f4fd6"), _hex("f2f2f2"))),
    ObjectClass("triangle", "triangle", "dots", (0.45, 0.3), (_hex("1a9e3a"), _hex("111111"))),
    ObjectClass("star", "star", "speckle", (0.5, 0.2), (_hex("ff7f0e"), _hex("7a1fa2"))),
    ObjectClass("cross", "cross", "gradient", (90.0,), (_hex("00c8d6"), _hex("e011c8"))),
    ObjectClass("arc", "arc", "stripes", (120.0, 0.45), (_hex("ff6fb0"), _hex("14206e"))),
    ObjectClass("diamond", "diamond", "grid", (0.5, 0.3), (_hex("f5e000"), _hex("0d4d1c"))),
    ObjectClass("hexagon", "hexagon", "rings", (0.45,), (_hex("008b80"), _hex("ff9a3c"))),
    ObjectClass("ellipse", "ellipse", "stripes", (0.0, 0.3), (_hex("6b3b16"), _hex("ead7b0"))),
    ObjectClass("lshape", "lshape", "checker", (0.3, 0.0), (_hex("e0202a"), _hex("40e0f0"))),
    ObjectClass("pentagon", "pentagon", "solid", (0.08,), (_hex("9be22d"), _hex("6fb814"))),
    ObjectClass("trapezoid", "trapezoid", "dots", (0.7, 0.35), (_hex("fafafa"), _hex("c1121f"))),
    ObjectClass("arrow", "arrow", "stripes", (90.0, 0.5), (_hex("101010"), _hex("ffd400"))),
    ObjectClass("crescent", "crescent", "radial", (), (_hex("7b2cbf"), _hex("f4eefc"))),
    ObjectClass("octagon", "octagon", "blotch", (0.5,), (_hex("1d4ed8"), _hex("22c55e"))),
    ObjectClass("tshape", "tshape", "stripes", (60.0, 0.45), (_hex("ff8c00"), _hex("ffffff"))),
    ObjectClass("parallelogram", "parallelogram", "grid", (0.35, 0.25), (_hex("6a0dad"), _hex("ffe45c"))),
    ObjectClass("semicircle", "semicircle", "checker", (0.45, 45.0), (_hex("2e8b57"), _hex("ff9ecf"))),
    ObjectClass("heart", "heart", "rings", (0.3,), (_hex("c8102e"), _hex("ffb3c1"))),
    ObjectClass("bar", "bar", "dots", (0.3, 0.25), (_hex("0b1d51"), _hex("5ce1e6"))),
)

BACKGROUNDS: tuple[str, ...] = ("gradient", "clouds", "grain", "waves", "tiles", "wood")

STREET_CATEGORIES: tuple[str, ...] = ("car", "truck", "bus", "pedestrian", "traffic light", "traffic sign")
STREET_ATTRIBUTES: dict[str, tuple[str, ...]] = {  # the BDD100K attribute values the street renderer draws
    "weather": ("clear", "overcast", "partly cloudy", "rainy", "snowy", "foggy"),
    "scene": ("city street", "highway", "residential"),
    "timeofday": ("daytime", "night", "dawn/dusk"),
}


@dataclass
class RenderedObject:
    """An object as it appears in the final image (after occlusion and clipping to the frame)."""

    label: int  # index into CATALOGUE (or STREET_CATEGORIES for street scenes)
    name: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixel-edge coordinates: mask lies in [x1, x2) x [y1, y2)
    mask: np.ndarray  # (H, W) bool, visible pixels only
    truncated: bool = False
    visible_fraction: float = 1.0  # visible pixels / pixels the object would cover in-frame without occluders

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[RenderedObject] = field(default_factory=list)

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")


# ----------------------------------------------------------------------------------------------- geometry


def _ngon(n: int, phase_deg: float) -> np.ndarray:
    t = np.deg2rad(phase_deg) + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _ellipse(rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.arange(n) * 2 * np.pi / n
    return np.stack([rx * np.cos(t), ry * np.sin(t)], 1)


def _arc_points(cx: float, cy: float, r: float, a0: float, a1: float, n: int = 24) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _star() -> np.ndarray:
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _crescent() -> np.ndarray:
    d, r2 = 0.45, 0.8  # inner (cut-away) circle: radius r2 centred at (d, 0)
    xi = (d * d + 1 - r2 * r2) / (2 * d)
    yi = np.sqrt(1 - xi * xi)
    a_out = np.arctan2(yi, xi)
    a_in = np.arctan2(yi, xi - d)
    outer = _arc_points(0, 0, 1, a_out, 2 * np.pi - a_out, 32)
    inner = _arc_points(d, 0, r2, 2 * np.pi - a_in, a_in, 24)
    return np.concatenate([outer, inner[1:-1]])


def _heart() -> np.ndarray:
    t = np.arange(48) * 2 * np.pi / 48
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _normalise(poly: np.ndarray) -> np.ndarray:
    """Centre the shape's bounding box and scale it so that its farthest vertex lies at radius 1."""
    poly = poly - (poly.min(0) + poly.max(0)) / 2
    return poly / np.sqrt((poly**2).sum(1)).max()


_RAW_SHAPES: dict[str, np.ndarray] = {
    "circle": _ellipse(1, 1),
    "square": _ngon(4, 45),
    "triangle": _ngon(3, -90),
    "star": _star(),
    "cross": np.array(
        [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
         (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], float),
    "arc": np.concatenate([_arc_points(0, 0, 1, np.pi / 4, 7 * np.pi / 4, 32),
                           _arc_points(0, 0, 0.55, 7 * np.pi / 4, np.pi / 4, 24)]),
    "diamond": _ngon(4, 0) * np.array([0.65, 1.0]),
    "hexagon": _ngon(6, 0),
    "ellipse": _ellipse(1, 0.55),
    "lshape": np.array([(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)], float),
    "pentagon": _ngon(5, -90),
    "trapezoid": np.array([(-1, 0.6), (1, 0.6), (0.45, -0.6), (-0.45, -0.6)], float),
    "arrow": np.array([(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)],
                      float),
    "crescent": _crescent(),
    "octagon": _ngon(8, 22.5),
    "tshape": np.array([(-1, -1), (1, -1), (1, -0.45), (0.28, -0.45), (0.28, 1), (-0.28, 1), (-0.28, -0.45),
                        (-1, -0.45)], float),
    "parallelogram": np.array([(-1, 0.55), (0.4, 0.55), (1, -0.55), (-0.4, -0.55)], float),
    "semicircle": _arc_points(0, 0, 1, np.pi, 2 * np.pi, 32),
    "heart": _heart(),
    "bar": np.array([(-1, -0.4), (1, -0.4), (1, 0.4), (-1, 0.4)], float),
}
SHAPES: dict[str, np.ndarray] = {k: _normalise(v) for k, v in _RAW_SHAPES.items()}


def polygon_area(poly: np.ndarray) -> float:
    """Absolute shoelace area of an (N, 2) polygon."""
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _transform(poly: np.ndarray, cx: float, cy: float, r: float, angle_deg: float, aspect: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    scaled = poly * np.array([r * aspect, r / aspect])
    return scaled @ rot.T + np.array([cx, cy])


def rasterize(polys: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """Union of filled polygons given in pixel-edge coordinates (pixel (r, c) has its centre at c+.5, r+.5)."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for poly in polys:
        pts = [(float(x) - 0.5, float(y) - 0.5) for x, y in poly]
        draw.polygon(pts, fill=1)
    return np.asarray(img, dtype=bool)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x1, y1, x2, y2), exclusive on the right/bottom; None for an empty mask."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_to_polygons(mask: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Trace a binary mask into exact pixel-edge polygons (4-connected components).

    Returns the corner vertices of the outer boundary of every component (their shoelace area equals the
    pixel count when there are no holes) and the number of holes, which COCO polygons cannot express and
    placement therefore rejects. Vectorised except for walking the (short) cycles.
    """
    mask = np.asarray(mask, bool)
    box = mask_box(mask)
    if box is None:
        return [], 0
    x0, y0, x1, y1 = box
    m = np.pad(mask[y0:y1, x0:x1], 1)
    fg = m[1:-1, 1:-1]
    width = fg.shape[1]
    parts = []
    # Each boundary edge is directed clockwise around its foreground pixel (y down), giving outer loops a
    # positive shoelace area and hole loops a negative one.
    for nb, (dx0, dy0, dx1, dy1) in (
        (m[:-2, 1:-1], (0, 0, 1, 0)),  # top edge, neighbour above is background
        (m[1:-1, 2:], (1, 0, 1, 1)),  # right
        (m[2:, 1:-1], (1, 1, 0, 1)),  # bottom
        (m[1:-1, :-2], (0, 1, 0, 0)),  # left
    ):
        r, c = np.nonzero(fg & ~nb)
        parts.append(np.stack([c + dx0, r + dy0, c + dx1, r + dy1, r * width + c], 1))
    e = np.concatenate(parts)
    stride = width + 2
    start, end = e[:, 1] * stride + e[:, 0], e[:, 3] * stride + e[:, 2]
    order = np.argsort(start, kind="stable")
    first = np.searchsorted(start[order], end)
    saddle = np.searchsorted(start[order], end, side="right") - first == 2
    nxt = order[first]
    # A saddle vertex has two outgoing edges; staying on the incoming edge's pixel makes the foreground
    # 4-connected (diagonal neighbours become separate components).
    other = saddle & (e[nxt, 4] != e[:, 4])
    nxt[other] = order[first[other] + 1]
    direction = (e[:, 2] - e[:, 0]) + 2 * (e[:, 3] - e[:, 1])
    pred = np.empty_like(nxt)
    pred[nxt] = np.arange(len(e))
    corner = direction != direction[pred]
    cross = e[:, 0] * e[:, 3] - e[:, 2] * e[:, 1]
    nxt_list = nxt.tolist()
    visited = bytearray(len(e))
    polys: list[np.ndarray] = []
    holes = 0
    offset = np.array([x0, y0], float)
    for s0 in range(len(e)):
        if visited[s0]:
            continue
        cyc = []
        j = s0
        while not visited[j]:
            visited[j] = 1
            cyc.append(j)
            j = nxt_list[j]
        idx = np.asarray(cyc)
        if cross[idx].sum() > 0:
            polys.append(e[idx[corner[idx]], :2].astype(float) + offset)
        else:
            holes += 1
    return polys, holes


# ----------------------------------------------------------------------------------------------- textures


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Integer lattice hash in [0, 1): platform independent, stable under translation of the lattice."""
    x = np.asarray(ix, np.int64).view(np.uint64)
    y = np.asarray(iy, np.int64).view(np.uint64)
    h = x * np.uint64(0x9E3779B1) ^ y * np.uint64(0x85EBCA77) ^ np.uint64((seed * 0xC2B2AE3D) & 0xFFFFFFFF)
    h = h & np.uint64(0xFFFFFFFF)
    h = (h ^ (h >> np.uint64(15))) * np.uint64(0x2C1B3C6D) & np.uint64(0xFFFFFFFF)
    h = (h ^ (h >> np.uint64(12))) * np.uint64(0x297A2D39) & np.uint64(0xFFFFFFFF)
    h = h ^ (h >> np.uint64(15))
    return h.astype(np.float64) / 2.0**32


def _value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth noise in [0, 1] with features about one lattice unit wide."""
    xi, yi = np.floor(x), np.floor(y)
    fx, fy = x - xi, y - yi
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    xi, yi = xi.astype(np.int64), yi.astype(np.int64)
    a, b = _hash01(xi, yi, seed), _hash01(xi + 1, yi, seed)
    c, d = _hash01(xi, yi + 1, seed), _hash01(xi + 1, yi + 1, seed)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _rot(u: np.ndarray, v: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.deg2rad(angle_deg)
    return u * np.cos(a) + v * np.sin(a), -u * np.sin(a) + v * np.cos(a)


def texture_pattern(kind: str, param: Sequence[float], u: np.ndarray, v: np.ndarray, seed: int,
                    px: float) -> np.ndarray:
    """Mixing weight in [0, 1] of the second colour at object-relative coordinates (u, v) (radius units).

    ``px`` is the size of one pixel in radius units; periods never go below ~2.5 pixels so patterns
    survive rendering at small sizes instead of aliasing into noise.
    """

    def period(p: float) -> float:
        return max(p, 2.5 * px)

    if kind == "stripes":
        s, _ = _rot(u, v, param[0])
        return (np.sin(2 * np.pi * s / period(param[1])) > 0).astype(float)
    if kind == "checker":
        s, t = _rot(u, v, param[1])
        p = period(param[0])
        return ((np.floor(s / p) + np.floor(t / p)) % 2).astype(float)
    if kind == "dots":
        p = period(param[0])
        s, t = u / p - np.round(u / p), v / p - np.round(v / p)
        return (s * s + t * t < param[1] ** 2).astype(float)
    if kind == "grid":
        p = period(param[0])
        s, t = np.abs(u / p - np.round(u / p)), np.abs(v / p - np.round(v / p))
        return ((s < param[1] / 2) | (t < param[1] / 2)).astype(float)
    if kind == "rings":
        return (np.sin(2 * np.pi * np.sqrt(u * u + v * v) / period(param[0])) > 0).astype(float)
    if kind == "gradient":
        s, _ = _rot(u, v, param[0])
        return np.clip((s + 1) / 2, 0, 1)
    if kind == "radial":
        return np.clip(np.sqrt(u * u + v * v), 0, 1)
    if kind == "speckle":
        cell = period(param[1]) / 2
        return (_hash01(np.floor(u / cell), np.floor(v / cell), seed) < param[0]).astype(float)
    if kind == "blotch":
        return (_value_noise(u / param[0] + 17.0, v / param[0] + 31.0, seed) > 0.5).astype(float)
    if kind == "solid":
        return param[0] * _hash01(np.floor(u / (2 * px)), np.floor(v / (2 * px)), seed)
    raise ValueError(f"unknown texture {kind!r}; known: stripes, checker, dots, grid, rings, gradient, radial, "
                     "speckle, blotch, solid")


def _mix(c1: np.ndarray, c2: np.ndarray, p: np.ndarray) -> np.ndarray:
    return c1 * (1 - p[..., None]) + c2 * p[..., None]


def _muted(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.85)))


def render_background(rng: np.random.Generator, width: int, height: int, pool: int = 0) -> np.ndarray:
    """A float (H, W, 3) background drawn from BACKGROUNDS with a muted palette (objects stay salient).

    ``pool`` > 0 draws one of ``pool`` shared backgrounds (the same ones in every dataset), so a background
    no longer identifies its image and the instance task has to look at the object.
    """
    if pool:
        rng = np.random.default_rng([0x6B67, int(rng.integers(pool))])
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    c1, c2 = _muted(rng), _muted(rng)
    seed = int(rng.integers(2**31))
    y, x = np.mgrid[0:height, 0:width] + 0.5
    s = float(min(width, height))
    angle = rng.uniform(0, 360)
    if kind == "gradient":
        t, _ = _rot(x, y, angle)
        p = (t - t.min()) / max(np.ptp(t), 1e-9)
    elif kind == "clouds":
        cell = s / rng.uniform(2, 4)
        p = 0.65 * _value_noise(x / cell, y / cell, seed) + 0.35 * _value_noise(2 * x / cell, 2 * y / cell, seed + 1)
    elif kind == "grain":
        p = 0.3 + 0.4 * _hash01(np.floor(x), np.floor(y), seed)
    elif kind == "waves":
        t, w = _rot(x, y, angle)
        per = s / rng.uniform(1.5, 3)
        p = 0.5 + 0.5 * np.sin(2 * np.pi * t / per + 1.5 * np.sin(2 * np.pi * w / (2 * per)))
    elif kind == "tiles":
        per = s / rng.uniform(3, 5)
        c2 = 0.6 * c1 + 0.4 * c2
        p = (np.floor(x / per) + np.floor(y / per)) % 2
        mortar = (np.minimum(x % per, y % per) < 1.0).astype(float)
        return _mix(_mix(c1, c2, p), c1 * 0.6, mortar)
    else:  # wood
        t, _ = _rot(x, y, angle)
        per = s / rng.uniform(4, 8)
        p = 0.5 + 0.5 * np.sin(2 * np.pi * (t + 0.5 * per * _value_noise(x / (s / 3), y / (s / 3), seed)) / per)
    return _mix(c1, c2, p)


# ----------------------------------------------------------------------------------------------- compositing


@dataclass
class _Item:
    label: int
    name: str
    full: np.ndarray  # in-frame pixels the object covers
    visible: np.ndarray
    truncated: bool


class _Layers:
    """Painter's-algorithm bookkeeping: accepts an object only if earlier ones stay sufficiently visible."""

    def __init__(self, min_visible: float, hole_free: bool, min_area: int):
        self.items: list[_Item] = []
        self.min_visible = min_visible
        self.hole_free = hole_free
        self.min_area = min_area

    def fits(self, mask: np.ndarray) -> bool:
        if mask.sum() < self.min_area:
            return False
        for it in self.items:
            if not (it.visible & mask).any():
                continue
            vis = it.visible & ~mask
            n = int(vis.sum())
            if n < max(self.min_area, self.min_visible * it.full.sum()):
                return False
            if self.hole_free:
                box = mask_box(vis)
                assert box is not None
                _, holes = mask_to_polygons(vis[box[1] : box[3], box[0] : box[2]])
                if holes:
                    return False
        return True

    def add(self, label: int, name: str, mask: np.ndarray, truncated: bool) -> None:
        for it in self.items:
            it.visible = it.visible & ~mask
        self.items.append(_Item(label, name, mask, mask.copy(), truncated))

    def objects(self) -> list[RenderedObject]:
        out = []
        for it in self.items:
            box = mask_box(it.visible)
            assert box is not None
            out.append(RenderedObject(it.label, it.name, box, it.visible, it.truncated,
                                      float(it.visible.sum() / it.full.sum())))
        return out


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0)))


@dataclass
class _Placed:
    """A catalogue object instance: geometry plus appearance, renderable at any position (videos)."""

    label: int
    r: float
    aspect: float
    angle: float
    colors: tuple[np.ndarray, np.ndarray]
    tex_angle: float
    seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator, label: int, r: float, max_rot: float = 30.0,
               colours: str = "class") -> _Placed:
        oc = CATALOGUE[label]
        brightness = rng.uniform(0.85, 1.1)
        if colours == "random":  # class = shape + texture only, as colour is a weak cue in real photos
            base = (_random_colour(rng), _random_colour(rng))
        elif colours == "class":
            base = oc.colors
        else:
            raise ValueError(f"colours={colours!r}: use 'class' or 'random'")
        c1, c2 = (np.clip((np.array(c) + rng.uniform(-0.06, 0.06, 3)) * brightness, 0, 1) for c in base)
        return cls(label, r, rng.uniform(0.85, 1.15), rng.uniform(-max_rot, max_rot), (c1, c2),
                   rng.uniform(-8, 8), int(rng.integers(2**31)))

    def polygon(self, cx: float, cy: float, angle: float | None = None) -> np.ndarray:
        shape = SHAPES[CATALOGUE[self.label].shape]
        return _transform(shape, cx, cy, self.r, self.angle if angle is None else angle, self.aspect)

    def paint(self, img: np.ndarray, mask: np.ndarray, cx: float, cy: float) -> None:
        box = mask_box(mask)
        if box is None:
            return
        x1, y1, x2, y2 = box
        y, x = np.mgrid[y1:y2, x1:x2] + 0.5
        u, v = (x - cx) / self.r, (y - cy) / self.r
        oc = CATALOGUE[self.label]
        param = list(oc.param)
        if oc.texture in ("stripes", "gradient"):
            param[0] += self.tex_angle
        p = texture_pattern(oc.texture, param, u, v, self.seed, 1.0 / self.r)
        m = mask[y1:y2, x1:x2]
        img[y1:y2, x1:x2][m] = _mix(self.colors[0], self.colors[1], p)[m]


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 0.015) -> np.ndarray:
    img = img + rng.normal(0.0, noise, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def render_centric(rng: np.random.Generator, label: int, width: int, height: int,
                   scale: tuple[float, float] = (0.55, 0.85), jitter: float = 0.08,
                   colours: str = "class", backgrounds: int = 0) -> Rendered:
    """ImageNet-like image: one large, roughly centred object of catalogue class ``label``."""
    img = render_background(rng, width, height, backgrounds)
    s = min(width, height)
    obj = _Placed.sample(rng, label, 0.5 * s * rng.uniform(*scale), colours=colours)
    cx = width / 2 + jitter * width * rng.uniform(-1, 1)
    cy = height / 2 + jitter * height * rng.uniform(-1, 1)
    mask = rasterize([obj.polygon(cx, cy)], width, height)
    obj.paint(img, mask, cx, cy)
    box = mask_box(mask)
    assert box is not None
    truncated = box[0] == 0 or box[1] == 0 or box[2] == width or box[3] == height
    return Rendered(_finish(img, rng), [RenderedObject(label, CATALOGUE[label].name, box, mask, truncated)])


def render_scene(rng: np.random.Generator, width: int, height: int, classes: Sequence[int], n_objects: int,
                 scale: tuple[float, float], probs: Sequence[float] | None = None, min_visible: float = 0.5,
                 hole_free: bool = False, min_area: int = 6, min_in_frame: float = 0.6,
                 tries: int = 30, colours: str = "class", backgrounds: int = 0) -> Rendered:
    """Scene-centric image: up to ``n_objects`` catalogue objects, later ones occluding earlier ones.

    A placement is resampled (``tries`` times, then the object is dropped) when it would leave an earlier
    object less than ``min_visible`` visible, or (``hole_free``) punch a hole into it, so every annotation
    describes a recognisable object and COCO polygons stay exact.
    """
    img = render_background(rng, width, height, backgrounds)
    layers = _Layers(min_visible, hole_free, min_area)
    s = min(width, height)
    p = None if probs is None else np.asarray(probs, float) / np.sum(probs)
    for _ in range(n_objects):
        for _t in range(tries):
            label = int(rng.choice(np.asarray(classes), p=p))
            obj = _Placed.sample(rng, label, 0.5 * s * rng.uniform(*scale), colours=colours)
            cx = rng.uniform(0.3 * obj.r, width - 0.3 * obj.r)
            cy = rng.uniform(0.3 * obj.r, height - 0.3 * obj.r)
            poly = obj.polygon(cx, cy)
            mask = rasterize([poly], width, height)
            whole = polygon_area(poly)
            if mask.sum() < min_in_frame * whole or not layers.fits(mask):
                continue
            obj.paint(img, mask, cx, cy)
            layers.add(label, CATALOGUE[label].name, mask, bool(mask.sum() < 0.97 * whole))
            break
    return Rendered(_finish(img, rng), layers.objects())


def render_video(rng: np.random.Generator, width: int, height: int, classes: Sequence[int], n_objects: int,
                 n_frames: int, scale: tuple[float, float], speed: tuple[float, float],
                 spin: float = 3.0, min_visible: float = 0.5, tries: int = 30,
                 colours: str = "class", backgrounds: int = 0) -> list[Rendered]:
    """DAVIS-like clip: objects glide (bouncing off the borders) over a static background.

    Object ``k`` of every frame is the same instance (painting order fixed), and each stays at least
    ``min_visible`` visible in every frame, so instance ids are stable for label propagation.
    """
    bg = render_background(rng, width, height, backgrounds)
    s = min(width, height)
    for n in range(n_objects, 0, -1):
        for _t in range(tries):
            objs = [_Placed.sample(rng, int(rng.choice(np.asarray(classes))), 0.5 * s * rng.uniform(*scale),
                                   colours=colours)
                    for _ in range(n)]
            tracks = []
            for o in objs:
                pos = np.array([rng.uniform(o.r, width - o.r), rng.uniform(o.r, height - o.r)])
                a = rng.uniform(0, 2 * np.pi)
                vel = rng.uniform(*speed) * np.array([np.cos(a), np.sin(a)])
                omega = rng.uniform(-spin, spin)
                track = []
                for f in range(n_frames):
                    track.append((pos[0], pos[1], o.angle + omega * f))
                    pos = pos + vel
                    lo, hi = 0.7 * o.r, np.array([width, height]) - 0.7 * o.r
                    bounce = (pos < lo) | (pos > hi)
                    vel = np.where(bounce, -vel, vel)
                    pos = np.clip(pos, lo, hi)
                tracks.append(track)
            frames = _video_frames(bg, objs, tracks, width, height, min_visible)
            if frames is not None:
                return [Rendered(_finish(img, rng), objects) for img, objects in frames]
    raise RuntimeError("could not place even one object in the video; increase the frame size or reduce scale")


def _video_frames(bg: np.ndarray, objs: list[_Placed], tracks: list[list[tuple[float, float, float]]],
                  width: int, height: int, min_visible: float
                  ) -> list[tuple[np.ndarray, list[RenderedObject]]] | None:
    frames = []
    for f in range(len(tracks[0])):
        img = bg.copy()
        layers = _Layers(min_visible, False, 6)
        for k, o in enumerate(objs):
            cx, cy, angle = tracks[k][f]
            mask = rasterize([o.polygon(cx, cy, angle)], width, height)
            if not layers.fits(mask):
                return None
            o.paint(img, mask, cx, cy)
            layers.add(o.label, CATALOGUE[o.label].name, mask, False)
        frames.append((img, layers.objects()))
    return frames


# ----------------------------------------------------------------------------------------------- depth scenes


@dataclass
class DepthRendered(Rendered):
    """A scene with its depth map: ``depth`` (H, W) float32 metres; per object (the order of ``objects``) the
    radius it was drawn at (pixels) and its distance (metres, at its rim; its centre bulges nearer)."""

    depth: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    radii: list[float] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)


def room_depth(width: int, height: int, near: float, far: float) -> np.ndarray:
    """Depth of the empty room (metres): ``far`` at the top edge falling linearly to ``near`` at the bottom."""
    y = (np.arange(height, dtype=np.float64) + 0.5) / height
    return np.repeat((far + (near - far) * y)[:, None], width, axis=1)


def render_depth_scene(rng: np.random.Generator, width: int, height: int, classes: Sequence[int], n_objects: int,
                       scale: tuple[float, float], sizes: Sequence[float], near: float = 2.0, far: float = 6.0,
                       min_depth: float = 1.0, bulge: float = 0.3, min_visible: float = 0.5, min_area: int = 6,
                       min_in_frame: float = 0.6, tries: int = 30, colours: str = "class",
                       backgrounds: int = 0) -> DepthRendered:
    """NYUD-like indoor scene: catalogue objects in a room, with a depth map that follows a pinhole camera.

    The room's depth falls linearly from ``far`` (top rows) to ``near`` (bottom rows). Class ``k`` has the
    physical size ``sizes[k]`` (metres), so an object drawn at radius ``r`` pixels stands at
    ``sizes[k] / (r / min(width, height))`` metres: depth is read off the image by recognising the class and
    measuring its apparent size. An object stands on the floor: its lowest point is placed where the room behind
    it is at least that far when it can be, otherwise its distance is clipped to the nearest room depth it
    covers; it is never nearer than ``min_depth`` (its bulging centre included). Objects are painted far to near
    (the painter's order is the depth order) with the same shapes, textures and colour modes as every other
    scene; a nearer object that would hide an earlier one below ``min_visible`` is dropped. The centre of an
    object bulges towards the camera by up to ``bulge * size`` (a smooth cap).
    """
    img = render_background(rng, width, height, backgrounds)
    room = room_depth(width, height, near, far)
    s = min(width, height)
    proposals = []
    for _ in range(n_objects):
        label = int(rng.choice(np.asarray(classes)))
        obj = _Placed.sample(rng, label, 0.5 * s * rng.uniform(*scale), colours=colours)
        size = float(sizes[label])
        closest = min_depth + bulge * size
        want = max(size * s / obj.r, closest)  # pinhole camera: distance = physical size / apparent size
        below = float(obj.polygon(0.0, 0.0)[:, 1].max())  # lowest point relative to the centre
        lowest_row = height * (far - want) / (far - near)  # the floor there is at distance `want`
        lo, hi = 0.3 * obj.r, height - 0.3 * obj.r
        hi_floor = min(hi, lowest_row - below)
        for _t in range(tries):
            cx = rng.uniform(0.3 * obj.r, width - 0.3 * obj.r)
            cy = rng.uniform(lo, hi_floor if hi_floor > lo else hi)
            poly = obj.polygon(cx, cy)
            mask = rasterize([poly], width, height)
            whole = polygon_area(poly)
            if mask.sum() < max(min_in_frame * whole, min_area):
                continue
            dist = float(np.clip(want, closest, max(closest, room[mask].min())))
            proposals.append((dist, obj, cx, cy, mask, bool(mask.sum() < 0.97 * whole)))
            break
    proposals.sort(key=lambda p: -p[0])  # far to near (stable: ties keep their sampling order)
    layers = _Layers(min_visible, False, min_area)
    depth = room.copy()
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    radii, distances = [], []
    for dist, obj, cx, cy, mask, cut in proposals:
        if not layers.fits(mask):
            continue
        obj.paint(img, mask, cx, cy)
        cap = np.sqrt(np.clip(1.0 - ((xx - cx) ** 2 + (yy - cy) ** 2) / obj.r**2, 0.0, 1.0))
        depth[mask] = (dist - bulge * float(sizes[obj.label]) * cap)[mask]
        layers.add(obj.label, CATALOGUE[obj.label].name, mask, cut)
        radii.append(float(obj.r))
        distances.append(dist)
    return DepthRendered(_finish(img, rng), layers.objects(), depth.astype(np.float32), radii, distances)


# ----------------------------------------------------------------------------------------------- street scenes


@dataclass
class _StreetObject:
    label: int
    depth: float  # 0 at the horizon, 1 at the bottom edge; painted far to near
    parts: list[tuple[list[np.ndarray], np.ndarray, bool]]  # (polygons, colour, emissive)
    extras: list[tuple[list[np.ndarray], np.ndarray]]  # non-object paint (sign poles)


def _rect(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    return np.array([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], float)


def _street_object(rng: np.random.Generator, label: int, bx: float, by: float, lane: float,
                   depth: float) -> _StreetObject:
    """Geometry of one street object anchored at its bottom centre; sizes scale with the lane width."""
    name = STREET_CATEGORIES[label]
    dark = np.array([0.08, 0.08, 0.09])
    body = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.8), rng.uniform(0.2, 0.95)))
    red = np.array([0.95, 0.1, 0.1])
    parts: list[tuple[list[np.ndarray], np.ndarray, bool]] = []
    extras: list[tuple[list[np.ndarray], np.ndarray]] = []
    if name in ("car", "truck", "bus"):
        w = lane * {"car": 0.5, "truck": 0.62, "bus": 0.66}[name] * rng.uniform(0.9, 1.1)
        top = {"car": 0.55, "truck": 1.1, "bus": 0.95}[name]
        x0, x1 = bx - w / 2, bx + w / 2
        parts.append(([_rect(x0 + 0.05 * w, by - 0.16 * w, x0 + 0.25 * w, by),
                       _rect(x1 - 0.25 * w, by - 0.16 * w, x1 - 0.05 * w, by)], dark, False))
        parts.append(([_rect(x0, by - top * w, x1, by - 0.12 * w)], body, False))
        if name == "car":
            cabin = np.array([(x0 + 0.1 * w, by - top * w), (x1 - 0.1 * w, by - top * w),
                              (x1 - 0.22 * w, by - 0.88 * w), (x0 + 0.22 * w, by - 0.88 * w)])
            parts.append(([cabin], body * 0.85, False))
            window = cabin.mean(0) + 0.72 * (cabin - cabin.mean(0))
            parts.append(([window], dark * 2.5, False))
        elif name == "bus":
            parts.append(([_rect(x0 + 0.06 * w, by - 0.85 * w, x1 - 0.06 * w, by - 0.6 * w)], dark * 3, False))
        else:
            parts.append(([_rect(x0 + 0.08 * w, by - 1.05 * w, x1 - 0.08 * w, by - 0.75 * w)], body * 0.7, False))
        parts.append(([_rect(x0 + 0.03 * w, by - 0.45 * w, x0 + 0.16 * w, by - 0.35 * w),
                       _rect(x1 - 0.16 * w, by - 0.45 * w, x1 - 0.03 * w, by - 0.35 * w)], red, True))
    elif name == "pedestrian":
        h = lane * 0.5 * rng.uniform(0.85, 1.1)
        coat = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.15, 0.6)))
        head = _ellipse(0.09 * h, 0.09 * h, 16) + np.array([bx, by - 0.89 * h])
        parts.append(([_rect(bx - 0.11 * h, by - 0.42 * h, bx - 0.02 * h, by),
                       _rect(bx + 0.02 * h, by - 0.42 * h, bx + 0.11 * h, by)], dark * 2, False))
        parts.append(([_rect(bx - 0.14 * h, by - 0.8 * h, bx + 0.14 * h, by - 0.4 * h)], coat, False))
        parts.append(([head], np.array([0.85, 0.65, 0.5]) * rng.uniform(0.5, 1.1), False))
    else:  # traffic sign / traffic light on a pole; the pole is scenery, not part of the object
        pole_h = lane * 0.8
        size = lane * 0.16
        cy = by - pole_h
        extras.append(([_rect(bx - 0.06 * size, cy, bx + 0.06 * size, by)], np.array([0.35, 0.35, 0.37])))
        if name == "traffic sign":
            shape = ("circle", "triangle", "square", "diamond")[int(rng.integers(4))]
            face = (np.array([0.85, 0.1, 0.1]), np.array([0.1, 0.3, 0.8]), np.array([0.95, 0.8, 0.1]))[
                int(rng.integers(3))]
            poly = _transform(SHAPES[shape], bx, cy, size, 0.0, 1.0)
            parts.append(([poly], np.array([0.95, 0.95, 0.95]), False))
            parts.append(([_transform(SHAPES[shape], bx, cy, size * 0.7, 0.0, 1.0)], face, False))
        else:
            parts.append(([_rect(bx - 0.45 * size, cy - 1.3 * size, bx + 0.45 * size, cy + 1.3 * size)],
                          dark, False))
            lit = int(rng.integers(3))
            for k, col in enumerate(([1, 0.15, 0.1], [1, 0.8, 0.1], [0.2, 1, 0.3])):
                lamp = _ellipse(0.3 * size, 0.3 * size, 12) + np.array([bx, cy + (k - 1) * 0.85 * size])
                parts.append(([lamp], np.array(col) * (1.0 if k == lit else 0.3), k == lit))
    return _StreetObject(label, depth, parts, extras)


def render_street(rng: np.random.Generator, width: int, height: int, n_objects: int, weather: str, scene: str,
                  timeofday: str, min_visible: float = 0.25, min_area: int = 4,
                  category_probs: Sequence[float] | None = None) -> Rendered:
    """BDD100K-like dashcam frame: sky, perspective road with lane lines, roadside scenery, and vehicles,
    pedestrians, signs and lights whose size follows the perspective. Weather / scene / time of day change
    the palette and brightness (night keeps lamps and tail lights bright)."""
    for key, value in (("weather", weather), ("scene", scene), ("timeofday", timeofday)):
        if value not in STREET_ATTRIBUTES[key]:
            raise ValueError(f"unknown {key} {value!r}; the street renderer knows {STREET_ATTRIBUTES[key]}")
    y, x = np.mgrid[0:height, 0:width] + 0.5
    hz = height * rng.uniform(0.38, 0.48)
    vx = width * rng.uniform(0.4, 0.6)
    n_lanes = int(rng.integers(2, 5)) if scene == "highway" else int(rng.integers(2, 4))
    half_bottom = width * rng.uniform(0.45, 0.7)  # road half-width at the bottom edge
    depth = np.clip((y - hz) / (height - hz), 0, None)  # 0 at horizon, 1 at bottom

    sky_top = {"clear": (0.35, 0.6, 0.95), "partly cloudy": (0.45, 0.65, 0.9), "overcast": (0.62, 0.64, 0.68),
               "rainy": (0.45, 0.47, 0.52), "snowy": (0.75, 0.77, 0.8), "foggy": (0.78, 0.78, 0.78)}[weather]
    sky = _mix(np.array(sky_top), np.array([0.85, 0.88, 0.92]), np.clip(y / hz, 0, 1))
    if weather == "partly cloudy":
        clouds = _value_noise(x / (width / 5), y / (height / 6), int(rng.integers(2**31)))
        sky = _mix(sky, np.ones(3), np.clip((clouds - 0.55) * 4, 0, 1))
    ground_col = np.array([0.85, 0.87, 0.9]) if weather == "snowy" else (
        np.array([0.3, 0.45, 0.2]) if scene == "residential" else np.array([0.5, 0.48, 0.45]))
    img = np.where((y < hz)[..., None], sky, ground_col * (0.8 + 0.2 * depth[..., None]))

    # roadside scenery above the horizon
    if scene == "city street":
        xs = 0.0
        while xs < width:
            bw = width * rng.uniform(0.06, 0.14)
            bh = hz * rng.uniform(0.3, 0.9)
            col = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 0.12), rng.uniform(0, 0.3), rng.uniform(0.3, 0.7)))
            m = (x >= xs) & (x < xs + bw) & (y >= hz - bh) & (y < hz)
            win = ((x - xs) % 3 < 1.2) & ((y - hz) % 3 < 1.2)
            img[m] = col
            img[m & win] = col * 0.6
            xs += bw
    elif scene == "residential":
        for _ in range(int(rng.integers(3, 7))):
            tx, tr = rng.uniform(0, width), height * rng.uniform(0.08, 0.16)
            m = (x - tx) ** 2 + ((y - (hz - tr)) * 1.2) ** 2 < tr**2
            img[m] = np.array([0.1, rng.uniform(0.3, 0.5), 0.12])
    else:  # highway: distant hills and a guard rail
        hill = hz - height * 0.06 * (1 + np.sin(x / width * rng.uniform(4, 9) + rng.uniform(0, 6)))
        img[(y >= hill) & (y < hz)] = np.array([0.35, 0.42, 0.38])

    # road with perspective and dashed lane lines
    half = half_bottom * depth
    road = (y >= hz) & (np.abs(x - vx) <= half)
    asphalt = 0.33 + 0.06 * _value_noise(x / 3, y / 3, int(rng.integers(2**31)))
    img[road] = np.stack([asphalt, asphalt, asphalt * 1.03], -1)[road]
    dash = np.sin(7.0 / np.maximum(depth, 1e-3) + rng.uniform(0, 6)) > 0
    line_w = np.maximum(0.35, 0.02 * half_bottom * depth)
    for k in range(1, n_lanes):
        lx = vx - half + 2 * half * k / n_lanes
        img[road & (np.abs(x - lx) < line_w) & dash] = np.array([0.92, 0.92, 0.9])
    for side in (-1, 1):
        edge = vx + side * half
        img[(y >= hz) & (np.abs(x - edge) < line_w)] = np.array([0.95, 0.85, 0.2]) if side < 0 else 0.92

    # objects: vehicles on lanes, pedestrians and poles at the roadside, drawn far to near
    probs = np.ones(len(STREET_CATEGORIES)) if category_probs is None else np.asarray(category_probs, float)
    probs = probs / probs.sum()
    proposals = []
    for _ in range(n_objects):
        label = int(rng.choice(len(STREET_CATEGORIES), p=probs))
        d = float(np.clip(rng.beta(1.3, 2.2) * 1.05 + 0.06, 0.06, 1.08))
        by = hz + d * (height - hz)
        hw = half_bottom * d
        lane = 2 * hw / n_lanes
        if label < 3:
            bx = vx - hw + (int(rng.integers(n_lanes)) + 0.5) * lane + rng.normal(0, 0.08 * lane)
        else:
            bx = vx + rng.choice([-1, 1]) * hw * rng.uniform(1.05, 1.35)
        proposals.append(_street_object(rng, label, bx, by, lane, d))
    proposals.sort(key=lambda o: o.depth)
    layers = _Layers(min_visible, False, min_area)
    emissive = np.zeros((height, width), bool)
    for obj in proposals:
        masks = [rasterize(polys, width, height) for polys, _, _ in obj.parts]
        mask = np.logical_or.reduce(masks)
        if not layers.fits(mask):
            continue
        for polys, col in obj.extras:
            m = rasterize(polys, width, height)
            img[m] = col
            emissive &= ~m
        for m, (_, col, glow) in zip(masks, obj.parts, strict=True):
            img[m] = col
            emissive = (emissive & ~m) | (m if glow else False)
        cut = mask.sum() < 0.97 * _unclipped_area(obj)
        layers.add(obj.label, STREET_CATEGORIES[obj.label], mask, bool(cut))

    if weather == "foggy":
        fog = np.where(y < hz, 0.7, 0.7 * (1 - depth) ** 1.5)[..., None]
        img = _mix(img, np.full(3, 0.8), fog[..., 0])
    if weather == "rainy":
        streak = _hash01(np.floor(x + 0.5 * y), np.floor(y / 4), int(rng.integers(2**31))) > 0.985
        img[streak] = img[streak] * 0.5 + 0.45
    if weather == "snowy":
        flake = _hash01(np.floor(x), np.floor(y), int(rng.integers(2**31))) > 0.985
        img[flake] = 0.95
    glow = img[emissive].copy()
    light = {"daytime": (1.0, 1.0, 1.0), "dawn/dusk": (0.75, 0.62, 0.5), "night": (0.22, 0.24, 0.32)}[timeofday]
    img = img * np.array(light) * rng.uniform(0.9, 1.1)
    img[emissive] = glow
    return Rendered(_finish(img, rng, 0.02), layers.objects())


def _unclipped_area(obj: _StreetObject) -> float:
    """Pixels a street object would cover without the frame border (union of its parts on a big canvas)."""
    pts = np.concatenate([p for polys, _, _ in obj.parts for p in polys])
    lo = np.floor(pts.min(0)) - 1
    hi = np.ceil(pts.max(0)) + 1
    size = (hi - lo).astype(int)
    shifted = [[p - lo for p in polys] for polys, _, _ in obj.parts]
    return float(np.logical_or.reduce([rasterize(polys, int(size[0]), int(size[1])) for polys in shifted]).sum())

