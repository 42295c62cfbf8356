"""The shapes world's renderer: factor rows -> anti-aliased 32x32 RGB scenes, masks and captions.

Two modes, each a numpy structured array of *rows* (one row = one scene, fully determining it):

* ``single``: one object. Captioned factors (``FACTORS``): shape, color, size, position (3x3 grid),
  background; uncaptioned nuisances: ``dx``, ``dy`` (position jitter, pixels, U(-1, 1)) and ``angle``
  (rotation, radians, U(0, 2 pi)). Caption: "a small red triangle at the top left on a gray background";
  the middle cell reads "in the center".
* ``multi`` (DEPICT's synthetic setting): 0-3 objects from the six ``CONCEPTS`` {red, green, blue} x
  {circle, rectangle}, each concept at most once, on a fixed black background. Every row stores a
  placement for *all six* concepts (six distinct cells of the 3x3 grid, jitter, radius, rectangle
  orientation) and a presence flag each: flipping a flag (``permute``) adds/removes that object and
  keeps the others' pixels exactly. Presence: independent Bernoulli(0.3) per concept, rows with more
  than 3 objects redrawn. Caption: the present concepts in ``CONCEPTS`` order, counts normalised to
  "1" as DEPICT does for COCO ("1 red circle, 1 blue rectangle"); no object reads "no objects" (the
  empty prompt "" is kept for the unconditional model).

Rendering: every pixel is the mean of a 4x4 grid of sub-pixel point samples (4x supersampling, then
area down-sampling), image = background * (1 - m) + colour * m where m is the object coverage: the masks
(``masks``) are exactly the blending weights. Everything is deterministic from the rows; rows are
deterministic from a seed (``sample_rows``) in blocks of 1024, so the first n rows of a split do not
depend on how many are drawn. Splits (``load_split``) use disjoint seeds derived from their names.
"""
from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BLOCK = 1024  # rows are drawn in seeded blocks of this size

SHAPES = ["square", "circle", "triangle", "star"]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple"]
SIZES = ["small", "medium", "large"]
POSITIONS = ["top left", "top center", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom center", "bottom right"]
BACKGROUNDS = ["black", "gray", "white", "dark blue"]
FACTORS: dict[str, list[str]] = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS,
                                 "background": BACKGROUNDS}
# category -> family -> values: the taxonomy DiffEx expands (level 1 = family, level 2 = value).
HIERARCHY: dict[str, dict[str, list[str]]] = {
    "shape": {"round": ["circle"], "polygon": ["square", "triangle", "star"]},
    "color": {"warm": ["red", "orange", "yellow"], "cool": ["green", "blue", "purple"]},
    "size": {"small": ["small"], "big": ["medium", "large"]},
    "position": {"top": POSITIONS[0:3], "middle": POSITIONS[3:6], "bottom": POSITIONS[6:9]},
    "background": {"dark": ["black", "dark blue"], "light": ["gray", "white"]},
}

COLOR_RGB = {"red": (0.90, 0.10, 0.10), "orange": (1.00, 0.55, 0.00), "yellow": (0.95, 0.90, 0.10),
             "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.35, 0.95), "purple": (0.60, 0.20, 0.80)}
BACKGROUND_RGB = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "white": (1.0, 1.0, 1.0),
                  "dark blue": (0.05, 0.08, 0.35)}
CELL_CENTERS = (8.0, 16.0, 24.0)  # pixel coordinates of the 3x3 grid's rows/columns
JITTER = 1.0  # single mode: position jitter U(-JITTER, JITTER) pixels per axis
SIZE_SCALE = (3.5, 4.75, 6.0)  # small, medium, large: the shape scale r in pixels
# shape extents relative to r (chosen for similar areas): circle radius r, square half-side 0.85 r,
# triangle circumradius 1.4 r, star outer radius 1.3 r with inner radius 0.55 of that.

CONCEPTS = ["red circle", "green circle", "blue circle", "red rectangle", "green rectangle", "blue rectangle"]
MULTI_BACKGROUND = "black"
MULTI_P, MULTI_MAX = 0.3, 3  # concept presence probability; at most this many objects
MULTI_CELL_CENTERS = (5.5, 16.0, 26.5)  # wider grid: neighbours' extents (<= 1.1 * 3.8 + 0.8 px) never touch
MULTI_JITTER, MULTI_RADIUS = 0.8, (2.8, 3.8)  # jitter (px) and object radius range (px)
NO_OBJECTS = "no objects"

SINGLE_DTYPE = np.dtype([("shape", "i1"), ("color", "i1"), ("size", "i1"), ("position", "i1"),
                         ("background", "i1"), ("dx", "f4"), ("dy", "f4"), ("angle", "f4")])
MULTI_DTYPE = np.dtype([("present", "?", (6,)), ("cell", "i1", (6,)), ("dx", "f4", (6,)), ("dy", "f4", (6,)),
                        ("radius", "f4", (6,)), ("vertical", "?", (6,))])
MODES = ("single", "multi")
SPLITS = ("train", "val", "test")


def mode_of(rows: np.ndarray) -> str:
    if rows.dtype == SINGLE_DTYPE:
        return "single"
    if rows.dtype == MULTI_DTYPE:
        return "multi"
    raise TypeError(f"not shapes rows: dtype {rows.dtype}")


# -- sampling ----------------------------------------------------------------------------------------
def _sample_block(mode: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if mode == "single":
        rows = np.zeros(n, SINGLE_DTYPE)
        for name, values in FACTORS.items():
            rows[name] = rng.integers(0, len(values), n)
        rows["dx"], rows["dy"] = rng.uniform(-JITTER, JITTER, (2, n))
        rows["angle"] = rng.uniform(0, 2 * math.pi, n)
        return rows
    rows = np.zeros(n, MULTI_DTYPE)
    present = rng.random((n, 6)) < MULTI_P
    while (bad := present.sum(1) > MULTI_MAX).any():  # redraw rows with too many objects
        present[bad] = rng.random((int(bad.sum()), 6)) < MULTI_P
    rows["present"] = present
    rows["cell"] = np.argsort(rng.random((n, 9)), axis=1)[:, :6]  # six distinct cells per row
    rows["dx"], rows["dy"] = rng.uniform(-MULTI_JITTER, MULTI_JITTER, (2, n, 6))
    rows["radius"] = rng.uniform(*MULTI_RADIUS, (n, 6))
    rows["vertical"] = rng.random((n, 6)) < 0.5
    return rows


def sample_rows(n: int, seed: int, mode: str = "single") -> np.ndarray:
    """``n`` random rows, all factors independent and uniform; block b uses SeedSequence([seed, b])."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    blocks = [_sample_block(mode, BLOCK, np.random.default_rng([seed, b])) for b in range(-(-n // BLOCK))]
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, SINGLE_DTYPE if mode == "single" else MULTI_DTYPE)


def split_seed(mode: str, split: str) -> int:
    """The seed of a split: a hash of its name, so train, val and test never share a seed."""
    if split not in SPLITS or mode not in MODES:
        raise ValueError(f"split must be one of {SPLITS} and mode one of {MODES}, got {split!r}, {mode!r}")
    return int.from_bytes(hashlib.blake2b(f"featinv-shapes/{mode}/{split}".encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=16)
def _load_split_cached(mode: str, split: str, n: int):
    rows = sample_rows(n, split_seed(mode, split), mode)
    return render(rows), rows


def load_split(mode: str, split: str, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images (n, 3, 32, 32) in [0, 1] and their rows: the first ``n`` scenes of a split (cached)."""
    x, rows = _load_split_cached(mode, split, int(n))
    return x.clone(), rows.copy()


# -- geometry ----------------------------------------------------------------------------------------
@functools.cache
def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    u = (torch.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    return u.view(1, 1, -1), u.view(1, -1, 1)  # x (1, 1, W), y (1, H, 1) in pixel units


def _polar_fold(x, y, n):
    """Distance and |angle| from the nearest vertex direction (vertex 0 points up) of an n-fold figure."""
    a = torch.atan2(y, x) + math.pi / 2
    beta = torch.remainder(a + math.pi / n, 2 * math.pi / n) - math.pi / n
    return torch.sqrt(x * x + y * y), beta.abs()


def _inside(shape: str, x, y, r):
    """Boolean inside-test on object-frame sub-pixel coordinates; ``r`` broadcasts (n, 1, 1)."""
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (x.abs() <= 0.85 * r) & (y.abs() <= 0.85 * r)
    if shape == "triangle":
        d, b = _polar_fold(x, y, 3)
        return d * torch.cos(b - math.pi / 3) <= 1.4 * r * math.cos(math.pi / 3)
    if shape == "star":
        big, small, half = 1.3 * r, 0.55 * 1.3 * r, math.pi / 5
        d, b = _polar_fold(x, y, 5)
        px, py = d * torch.cos(b), d * torch.sin(b)
        bx, by = small * math.cos(half), small * math.sin(half)
        return (bx - big) * py - by * (px - big) >= 0  # origin side of the edge outer->inner vertex
    if shape == "rectangle":  # axis-aligned; r = (n, 1, 1, 2) half extents (x, y)
        return (x.abs() <= r[..., 0]) & (y.abs() <= r[..., 1])
    raise ValueError(shape)


def _coverage(kind: list[str], cx, cy, scale, angle) -> torch.Tensor:
    """Area coverage (n, 32, 32) of n objects: kind[i] at (cx, cy), scale, rotation."""
    X, Y = _grid()
    n = len(kind)
    out = torch.zeros(n, IMAGE_SIZE * SUPERSAMPLE, IMAGE_SIZE * SUPERSAMPLE)
    kinds = np.asarray(kind)
    for name in dict.fromkeys(kind):
        sel = torch.from_numpy(np.nonzero(kinds == name)[0])
        dx, dy = X - cx[sel, None, None], Y - cy[sel, None, None]
        c, s = torch.cos(angle[sel])[:, None, None], torch.sin(angle[sel])[:, None, None]
        x, y = c * dx + s * dy, -s * dx + c * dy
        r = scale[sel][:, None, None] if scale.ndim == 1 else scale[sel][:, None, None, :]
        out[sel] = _inside(name, x, y, r).float()
    return F.avg_pool2d(out[:, None], SUPERSAMPLE)[:, 0]


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: field views of packed rows are strided


def _single_masks(rows: np.ndarray) -> torch.Tensor:
    pos = rows["position"].astype(int)
    cx = _t(np.take(CELL_CENTERS, pos % 3) + rows["dx"])
    cy = _t(np.take(CELL_CENTERS, pos // 3) + rows["dy"])
    scale = _t(np.take(SIZE_SCALE, rows["size"].astype(int)))
    return _coverage([SHAPES[k] for k in rows["shape"]], cx, cy, scale, _t(rows["angle"]))


def _multi_masks(rows: np.ndarray) -> torch.Tensor:
    """(n, 6, 32, 32) coverage of each concept (zero where absent)."""
    n = len(rows)
    out = torch.zeros(n, 6, IMAGE_SIZE, IMAGE_SIZE)
    idx = np.argwhere(rows["present"])  # (k, 2): row, concept
    if len(idx) == 0:
        return out
    i, j = idx[:, 0], idx[:, 1]
    cell = rows["cell"][i, j].astype(int)
    cx = _t(np.take(MULTI_CELL_CENTERS, cell % 3) + rows["dx"][i, j])
    cy = _t(np.take(MULTI_CELL_CENTERS, cell // 3) + rows["dy"][i, j])
    rad = rows["radius"][i, j]
    kinds = [CONCEPTS[c].split()[1] for c in j]
    is_rect = np.array([k == "rectangle" for k in kinds])
    cov = torch.zeros(len(idx), IMAGE_SIZE, IMAGE_SIZE)
    if (~is_rect).any():
        s = np.nonzero(~is_rect)[0]
        cov[s] = _coverage(["circle"] * len(s), cx[s], cy[s], _t(rad[s]), torch.zeros(len(s)))
    if is_rect.any():
        s = np.nonzero(is_rect)[0]
        long, short = 1.1 * rad[s], 0.6 * rad[s]
        vert = rows["vertical"][i[s], j[s]]
        half = _t(np.stack([np.where(vert, short, long), np.where(vert, long, short)], 1))
        cov[s] = _coverage(["rectangle"] * len(s), cx[s], cy[s], half, torch.zeros(len(s)))
    out[i, j] = cov
    return out


def _chunked(fn, rows: np.ndarray, chunk: int = 256) -> torch.Tensor:
    return torch.cat([fn(rows[i:i + chunk]) for i in range(0, len(rows), chunk)]) if len(rows) else fn(rows)


# -- public rendering API ----------------------------------------------------------------------------
def masks(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Per-pixel coverage in [0, 1]. single: ``object`` (N, 32, 32); multi: ``concepts`` (N, 6, 32, 32)
    (order ``CONCEPTS``) and ``object`` (their sum); both: ``background`` = 1 - object."""
    if mode_of(rows) == "single":
        obj = _chunked(_single_masks, rows) if len(rows) else torch.zeros(0, IMAGE_SIZE, IMAGE_SIZE)
        return {"object": obj, "background": 1 - obj}
    con = _chunked(_multi_masks, rows) if len(rows) else torch.zeros(0, 6, IMAGE_SIZE, IMAGE_SIZE)
    obj = con.sum(1).clamp(max=1)
    return {"concepts": con, "object": obj, "background": 1 - obj}


def render(rows: np.ndarray) -> torch.Tensor:
    """Images (N, 3, 32, 32) float32 in [0, 1], deterministic from ``rows``."""
    m = masks(rows)
    if mode_of(rows) == "single":
        bg = _t([BACKGROUND_RGB[BACKGROUNDS[k]] for k in rows["background"]]).view(-1, 3, 1, 1)
        fg = _t([COLOR_RGB[COLORS[k]] for k in rows["color"]]).view(-1, 3, 1, 1)
        obj = m["object"][:, None]
        return (bg * (1 - obj) + fg * obj).clamp(0, 1)
    bg = _t(BACKGROUND_RGB[MULTI_BACKGROUND]).view(1, 3, 1, 1)
    rgb = _t([COLOR_RGB[c.split()[0]] for c in CONCEPTS])  # (6, 3)
    fg = torch.einsum("nkhw,kc->nchw", m["concepts"], rgb)
    return (bg * m["background"][:, None] + fg).clamp(0, 1)


def caption(row, keep=None) -> str:
    """The grammar's caption of one row (single or multi). ``keep`` (single mode): the captioned factors
    to mention (default all); a dropped shape reads "shape" ("a red shape at the top left")."""
    if row.dtype == MULTI_DTYPE:
        names = [CONCEPTS[k] for k in range(6) if row["present"][k]]
        return ", ".join(f"1 {c}" for c in names) if names else NO_OBJECTS
    keep = FACTORS.keys() if keep is None else keep
    words = ["a"]
    words += [SIZES[row["size"]]] if "size" in keep else []
    words += [COLORS[row["color"]]] if "color" in keep else []
    words += [SHAPES[row["shape"]] if "shape" in keep else "shape"]
    if "position" in keep:
        pos = POSITIONS[row["position"]]
        words += ["in the center"] if pos == "center" else [f"at the {pos}"]
    words += [f"on a {BACKGROUNDS[row['background']]} background"] if "background" in keep else []
    return " ".join(words)


def captions(rows: np.ndarray, keep=None) -> list[str]:
    return [caption(r, keep) for r in rows]


def labels(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """single: factor name -> (N,) int64 value index; multi: {"presence": (N, 6) bool}."""
    if mode_of(rows) == "multi":
        return {"presence": torch.from_numpy(rows["present"].copy())}
    return {k: torch.from_numpy(rows[k].astype(np.int64)) for k in FACTORS}


# -- oracle counterfactuals ------------------------------------------------------------------------
def edit(rows: np.ndarray, factor: str, value: int | str | np.ndarray) -> np.ndarray:
    """The oracle edit: copies of single-mode ``rows`` with one captioned factor set to ``value``
    (index or name; an array gives one value per row); every other factor and nuisance is kept."""
    if mode_of(rows) != "single" or factor not in FACTORS:
        raise ValueError(f"edit takes single-mode rows and a factor in {list(FACTORS)}")
    if isinstance(value, str):
        value = FACTORS[factor].index(value)
    out = rows.copy()
    out[factor] = value
    return out


def permute(rows: np.ndarray, presence) -> np.ndarray:
    """The oracle permutation: copies of multi-mode ``rows`` with concept presence replaced by
    ``presence`` (N, 6); objects that stay present keep their exact placement, added ones appear at
    the row's reserved placement for that concept (never overlapping the others)."""
    if mode_of(rows) != "multi":
        raise ValueError("permute takes multi-mode rows")
    presence = np.asarray(presence, dtype=bool)
    if presence.shape != (len(rows), 6):
        raise ValueError(f"presence must be ({len(rows)}, 6), got {presence.shape}")
    out = rows.copy()
    out["present"] = presence
    return out
