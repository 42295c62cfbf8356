"""The shapes world: renderer, captions, splits, tokenizer, the SD folders, readers, probes, guidance."""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from featinv.zoo.shapes import world as W  # noqa: E402

WEIGHTS = W.__file__.rsplit("/", 2)[0] + "/weights"
META = json.loads(open(f"{WEIGHTS}/meta.json").read())


def _row(**kw):
    r = np.zeros(1, W.SINGLE_DTYPE)
    for k, v in kw.items():
        r[k] = W.FACTORS[k].index(v) if isinstance(v, str) else v
    return r


# -- renderer --------------------------------------------------------------------------------------
def test_render_is_deterministic_and_in_range():
    rows = W.sample_rows(300, seed=5)
    assert np.array_equal(rows, W.sample_rows(300, seed=5))
    assert not np.array_equal(rows, W.sample_rows(300, seed=6))
    a, b = W.render(rows), W.render(rows.copy())
    assert a.shape == (300, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    m = W.render(W.sample_rows(300, seed=5, mode="multi"))
    assert m.shape == (300, 3, 32, 32) and torch.isfinite(m).all()
    # first n rows do not depend on how many are drawn (blocks of BLOCK rows)
    assert np.array_equal(W.sample_rows(W.BLOCK + 5, seed=1)[:10], W.sample_rows(10, seed=1))


@pytest.mark.parametrize("shape,area", [
    ("circle", lambda r: math.pi * r * r), ("square", lambda r: (1.7 * r) ** 2),
    ("triangle", lambda r: 3 * math.sqrt(3) / 4 * (1.4 * r) ** 2),
    ("star", lambda r: 5 * 1.3 * r * 0.55 * 1.3 * r * math.sin(math.pi / 5))])
def test_mask_area_matches_the_drawn_object(shape, area):
    for size, r in zip(W.SIZES, W.SIZE_SCALE):
        row = _row(shape=shape, size=size, position="center", color="red", background="gray", angle=0.3)
        m = W.masks(row)
        assert abs(float(m["object"].sum()) - area(r)) / area(r) < 0.03, (shape, size)
        assert torch.allclose(m["object"] + m["background"], torch.ones(1, 32, 32))
        img = W.render(row)[0]
        bg, fg = torch.tensor(W.BACKGROUND_RGB["gray"]), torch.tensor(W.COLOR_RGB["red"])
        expect = bg.view(3, 1, 1) * (1 - m["object"]) + fg.view(3, 1, 1) * m["object"]
        assert torch.allclose(img, expect[0] if expect.ndim == 4 else expect, atol=1e-6)


def test_position_and_size_move_the_mask():
    def centroid(row):
        m = W.masks(row)["object"][0]
        yy, xx = torch.meshgrid(torch.arange(32.) + 0.5, torch.arange(32.) + 0.5, indexing="ij")
        return float((m * xx).sum() / m.sum()), float((m * yy).sum() / m.sum())

    for k, pos in enumerate(W.POSITIONS):
        cx, cy = centroid(_row(shape="circle", position=pos, dx=0.5, dy=-0.25))
        assert abs(cx - W.CELL_CENTERS[k % 3] - 0.5) < 0.05 and abs(cy - W.CELL_CENTERS[k // 3] + 0.25) < 0.05
    areas = [float(W.masks(_row(shape="square", size=s))["object"].sum()) for s in W.SIZES]
    assert areas[0] < areas[1] < areas[2]


def test_oracle_edit_of_colour_changes_only_object_pixels():
    rows = W.sample_rows(64, seed=3)
    new = W.edit(rows, "color", (rows["color"] + 1) % len(W.COLORS))
    assert np.array_equal(new["shape"], rows["shape"]) and np.array_equal(new["angle"], rows["angle"])
    diff = (W.render(new) - W.render(rows)).abs().amax(1)
    obj = W.masks(rows)["object"]
    assert (diff[obj == 0] == 0).all()  # background untouched
    assert (diff[obj > 0.05] > 0).all()  # every object pixel changed
    bg = W.edit(rows, "background", "white")
    assert (W.labels(bg)["background"] == 2).all()
    assert torch.equal(W.masks(bg)["object"], obj)  # the object stays where it was


def test_multi_mode_masks_presence_and_permutation():
    rows = W.sample_rows(400, seed=2, mode="multi")
    pres = W.labels(rows)["presence"]
    assert pres.sum(1).max() <= W.MULTI_MAX and (pres.sum(1) == 0).any() and (pres.sum(1) == 3).any()
    m = W.masks(rows)
    assert m["concepts"].shape == (400, 6, 32, 32)
    assert m["concepts"].sum(1).max() <= 1 + 1e-6  # objects never overlap
    covered = m["concepts"].sum((2, 3)) > 1
    assert torch.equal(covered, pres)  # a concept has pixels iff it is present
    # oracle permutation: flip one concept; the other objects keep their exact pixels
    new_p = rows["present"].copy()
    new_p[:, 2] = ~new_p[:, 2]
    perm = W.permute(rows, new_p)
    mp = W.masks(perm)["concepts"]
    assert torch.equal(mp[:, [0, 1, 3, 4, 5]], m["concepts"][:, [0, 1, 3, 4, 5]])
    assert torch.equal(mp[:, 2].sum((1, 2)) > 1, torch.from_numpy(new_p[:, 2]))
    assert (mp.sum(1) <= 1 + 1e-6).all()


def test_captions_follow_the_grammar():
    row = _row(shape="triangle", color="red", size="small", position="top left", background="gray")
    assert W.caption(row[0]) == "a small red triangle at the top left on a gray background"
    row = _row(shape="circle", color="orange", size="large", position="center", background="dark blue")
    assert W.caption(row[0]) == "a large orange circle in the center on a dark blue background"
    assert W.caption(row[0], ["color", "shape"]) == "a orange circle"
    assert W.caption(row[0], ["color"]) == "a orange shape"
    m = np.zeros(1, W.MULTI_DTYPE)
    assert W.caption(m[0]) == "no objects"
    m["present"][0, [0, 5]] = True
    assert W.caption(m[0]) == "1 red circle, 1 blue rectangle"
    for f, fam in W.HIERARCHY.items():  # the hierarchy covers every value exactly once
        assert sorted(v for vs in fam.values() for v in vs) == sorted(W.FACTORS[f])


def test_splits_are_disjoint_and_cached():
    rows = {s: W.load_split("single", s, 512)[1] for s in W.SPLITS}
    seeds = {W.split_seed("single", s) for s in W.SPLITS} | {W.split_seed("multi", s) for s in W.SPLITS}
    assert len(seeds) == 6
    keys = {s: {(r["dx"], r["dy"], r["angle"]) for r in rows[s]} for s in W.SPLITS}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    x1, r1 = W.load_split("single", "test", 64)
    x2, r2 = W.load_split("single", "test", 64)
    assert torch.equal(x1, x2) and np.array_equal(r1, r2)
    x1.zero_()  # callers get copies
    assert W.load_split("single", "test", 64)[0].max() > 0
    assert torch.equal(W.load_split("single", "test", 16)[0], x2[:16])
    with pytest.raises(ValueError):
        W.load_split("single", "holdout", 8)


# -- tokenizer -------------------------------------------------------------------------------------
def test_every_grammar_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from featinv.zoo.shapes import text as T

    words = T.grammar_words()
    assert {"triangle", "rectangle", "purple", "background", ",", "1", "shape"} <= set(words)
    T.save_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert T.split_words(tok) == {}
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.decode(ids) == w
    cap = "a small red triangle at the top left on a dark blue background"
    ids = tok(cap).input_ids
    assert len(ids) == len(cap.split()) + 2 and tok.decode(ids, skip_special_tokens=True) == cap
    assert tok.model_max_length == T.MAX_LENGTH >= max(len(tok(c).input_ids) for c in T.caption_corpus())
    assert len(tok("a zebra", add_special_tokens=False).input_ids) > 2  # unknown words: byte-level pieces
