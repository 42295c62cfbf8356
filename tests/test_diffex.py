"""DiffEx (featinv.explain.diffex) at reduced size: beam search on a toy editor with a known answer, the
renderer oracle on a planted classifier, edit quality, LEDITS++ on a tiny SD folder, the Lightning module."""
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from featinv.explain import shapes_oracles as SO
from featinv.explain.diffex import EditScorer, Hierarchy, compare, edit_quality, run_diffex, spearman
from featinv.zoo.shapes import world as W

ROOT = Path(__file__).resolve().parents[1]
TOY = {"domain": "toy", "categories": {
    "a": {"template": "p-{}", "items": {"a1": ["x", "y"], "a2": ["z"]}},
    "b": {"items": {"b1": ["u", {"v": "special v"}], "b2": ["w"]}}}}
EFFECT = {"p-x": 0.1, "p-y": 0.9, "p-z": -0.2, "u": 0.05, "special v": -0.3, "w": 0.0}


class ToyEditor:
    """edit(prompts) -> images whose score is the mean effect of the prompts (+ a small seed term)."""

    def __init__(self, n=3):
        self.n, self.calls = n, []

    def edit(self, prompts, seed=0):
        self.calls.append((tuple(prompts), seed))
        v = np.mean([EFFECT[p] for p in prompts]) + 0.001 * seed
        return torch.full((self.n, 1, 2, 2), float(v))


def toy_score(x):
    return x.flatten(1).mean(1)


def test_hierarchy_from_yaml_phrases_keywords():
    h = Hierarchy.from_dict(TOY)
    assert [n.name for n in h.level1] == ["a/a1", "a/a2", "b/b1", "b/b2"]
    assert h.node("y").prompts == ("p-y",) and h.node("v").prompts == ("special v",)
    assert h.node("a/a1").prompts == ("p-x", "p-y")  # an item is edited with all its keywords
    shapes = Hierarchy.from_yaml(ROOT / "configs" / "explain" / "hierarchy_shapes.yaml")
    assert len(shapes.leaves) == sum(len(v) for v in W.FACTORS.values())  # every factor value, once
    assert {SO.keyword_factor(leaf.keyword) for leaf in shapes.leaves} == {
        (f, i) for f, vals in W.FACTORS.items() for i in range(len(vals))}
    assert shapes.node("center").prompts == ("a shape in the center",)
    with pytest.raises(ValueError, match="categories"):
        Hierarchy.from_dict({"domain": "x"})


def test_beam_search_returns_the_true_leaf_first_and_memoises_edits():
    h, ed = Hierarchy.from_dict(TOY), ToyEditor()
    scorer = EditScorer(ed, toy_score, torch.zeros(3, 1, 2, 2), seeds=[0, 1])
    r = run_diffex(h, scorer, beam_size=1, top_k=2)
    assert r.beam == ["a/a1"] and r.level1["a/a1"] == pytest.approx(0.5005)
    assert [p for p, _ in r.top] == ["a/a1/y", "a/a1/x"] and r.top[0][1] == pytest.approx(0.9005)
    assert "b/b1/v" not in r.leaves  # outside the beam: never edited
    assert len(ed.calls) == 2 * (4 + 2)  # 4 items + 2 keywords, 2 seeds each
    r2 = run_diffex(h, scorer, beam_size=2, top_k=5, score_all_leaves=True)
    assert r2.beam == ["a/a1", "a/a2"] and set(r2.all_leaves) == {n.name for n in h.leaves}
    assert len(ed.calls) == 2 * (4 + 2 + 2)  # z and w share their item's edit (same prompts): only u, v are new
    assert r2.all_leaves["b/b1/v"] == pytest.approx(-0.2995)
    # min_delta drops items and keywords below it (|b1| = 0.125 and x = 0.1 are filtered)
    assert [p for p, _ in run_diffex(h, scorer, beam_size=4, min_delta=0.25).top] == ["a/a1/y"]
    json.dumps(r2.to_dict(), allow_nan=False)


def test_exact_oracle_scores_an_item_by_its_strongest_keyword_and_compare():
    h = Hierarchy.from_dict(TOY)

    class Exact(ToyEditor):
        exact = True

        def edit(self, keyword, seed=0):
            return super().edit([h.node(keyword).prompts[0]], seed)

    oracle = run_diffex(h, EditScorer(Exact(), toy_score, torch.zeros(3, 1, 2, 2)), beam_size=1, score_all_leaves=True)
    assert oracle.level1["a/a1"] == pytest.approx(0.9) and oracle.level1["b/b1"] == pytest.approx(-0.3)
    assert oracle.seeds == [0]
    diffex = run_diffex(h, EditScorer(ToyEditor(), toy_score, torch.zeros(3, 1, 2, 2), seeds=[0]), beam_size=1,
                        top_k=2, score_all_leaves=True)
    c = compare(diffex, oracle, lambda k: k.split("/")[0], used_threshold=0.25)
    assert c["spearman"] == pytest.approx(1.0) and c["true_child"] == "a/a1/y" and c["true_parent"] == "a/a1"
    assert c["parent_in_beam"] and c["child_first"] and c["used_factors"] == ["a", "b"] and c["recall"] == 0.5
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1) and spearman([1, 1, 1], [1, 2, 3]) is None


def test_edit_quality_counts_success_and_leakage_on_non_trivial_edits():
    h = Hierarchy.from_dict({"categories": {"color": {"items": {"c": ["red", "blue"]}},
                                            "size": {"items": {"s": ["small"]}}}})

    class Pixels:  # image = (colour index, size index) in two pixels; "small" also resets the colour (leaks)
        def edit(self, prompts, seed=0):
            x = torch.zeros(4, 1, 1, 2)
            x[:, 0, 0, 0] = {"red": 0, "blue": 4}.get(prompts[0], 0)
            x[:, 0, 0, 1] = 1.0 if prompts[0] == "blue" else (0.0 if prompts[0] == "small" else 1.0)
            return x

    orig = torch.zeros(4, 1, 1, 2)
    orig[:2, 0, 0, 0], orig[:, 0, 0, 1] = 4, 1  # images 0, 1 blue; all "medium" (1)
    s = EditScorer(Pixels(), toy_score, orig, seeds=[0])
    for leaf in h.leaves:
        s.images(leaf, 0)

    def read(x):
        return {"color": x[:, 0, 0, 0].long(), "size": x[:, 0, 0, 1].long()}

    q = edit_quality(s, orig, h.leaves, read, lambda k: {"red": ("color", 0), "blue": ("color", 4),
                                                         "small": ("size", 0)}[k])
    # red on 2 blue images, blue on 2 red images, small on 4 medium images: all succeed; small turns the
    # two blue images red: 2 leaks of 8
    assert q["edits"] == 8 and q["success"] == 1.0 and q["leakage"] == 0.25
    assert q["per_factor"]["color"] == {"edits": 4, "success": 1.0, "leakage": 0.0, "leaked_into": {"size": 0.0}}
    assert q["per_factor"]["size"]["leakage"] == 0.5 and q["per_factor"]["size"]["leaked_into"] == {"color": 0.5}
    # a family (level-1 node) succeeds when the judge reads any of its values; images already in it are skipped
    fam = h.level1[0]  # color/c = {red, blue}: every image is already red or blue -> nothing to judge
    s.images(fam, 0)
    with pytest.raises(ValueError, match="no edits to judge"):
        edit_quality(s, orig, [fam], read, lambda k: {"red": ("color", 0), "blue": ("color", 4)}[k])
    size_fam = h.level1[1]  # size/s = {small}: the "small" edit judged as a family gives the leaf's numbers
    qf = edit_quality(s, orig, [size_fam], read, lambda k: {"small": ("size", 0)}[k])
    assert qf["per_factor"]["size"] == q["per_factor"]["size"]


def test_edit_quality_judges_a_family_edit_by_any_of_its_values():
    """A family (level-1 node) succeeds on an image outside it when the judge reads any of its values -- here
    the second one; images already in the family are not judged; a family mixing factors is refused."""
    h = Hierarchy.from_dict({"categories": {"color": {"items": {"warm": ["red", "orange"]}},
                                            "mixed": {"items": {"m": ["red", "small"]}}}})
    value = {"red": ("color", 0), "orange": ("color", 1), "small": ("size", 0)}

    class ToOrange:  # every family edit paints the colour pixel 1 (orange); image 3 also loses its size (leak)
        def edit(self, prompts, seed=0):
            x = orig.clone()
            x[:, 0, 0, 0] = 1
            x[3, 0, 0, 1] = 0
            return x

    orig = torch.zeros(4, 1, 1, 2)
    orig[:, 0, 0, 0] = torch.tensor([0.0, 2.0, 3.0, 4.0])  # red (in the family), green, blue, purple
    orig[:, 0, 0, 1] = 1
    s = EditScorer(ToOrange(), toy_score, orig, seeds=[0])
    warm = h.level1[0]
    s.images(warm, 0)

    def read(x):
        return {"color": x[:, 0, 0, 0].long(), "size": x[:, 0, 0, 1].long()}

    q = edit_quality(s, orig, [warm], read, lambda k: value[k])
    assert q["edits"] == 3 and q["success"] == 1.0 and q["leakage"] == pytest.approx(1 / 3)
    assert q["per_factor"]["color"]["leaked_into"] == {"size": pytest.approx(1 / 3)}
    s.images(h.level1[1], 0)
    with pytest.raises(ValueError, match="mixes factors"):
        edit_quality(s, orig, [h.level1[1]], read, lambda k: value[k])


def test_renderer_oracle_explains_a_planted_colour_classifier():
    h = Hierarchy.from_yaml(ROOT / "configs" / "explain" / "hierarchy_shapes.yaml")
    x, rows = W.load_split("single", "val", 12)
    reader = SO.factor_reader()

    def p_red(images):  # a "classifier" that truly uses colour only: the reader's P(colour = red)
        from featinv.zoo.shapes.reader import load_reader

        net = p_red.net = getattr(p_red, "net", None) or load_reader()
        return net.predict(images)["color"].softmax(1)[:, 0]

    oracle = run_diffex(h, EditScorer(SO.RendererEditor(rows), p_red, x), beam_size=2, top_k=3,
                        score_all_leaves=True)
    assert oracle.top[0][0] == "color/warm/red" and oracle.top[0][1] > 0.5
    assert "color/warm" in oracle.beam
    assert all(abs(d) < 0.05 for k, d in oracle.all_leaves.items() if not k.startswith("color/"))
    s = EditScorer(SO.RendererEditor(rows), p_red, x)
    for leaf in h.leaves:
        s.images(leaf, 0)
    q = edit_quality(s, x, h.leaves, reader, SO.keyword_factor)  # exact edits, as the reader sees them
    assert q["edits"] > 200 and q["success"] > 0.95 and q["leakage"] < 0.05
    c = compare(oracle, oracle, lambda k: SO.keyword_factor(k.rsplit("/", 1)[-1])[0])
    assert c["used_factors"] == ["color"] and c["recall"] == 1.0 and c["child_first"]


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    from _tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-shapes-sd"))


def test_ledits_inverts_once_per_seed_and_batched_edits_equal_single_edits(tiny_sd_dir):
    from featinv.explain.ledits import LeditsEditor, _batched_store_call, load_ledits_pipeline

    pipe = load_ledits_pipeline(tiny_sd_dir)
    x, _ = W.load_split("single", "val", 3)
    # edit_threshold=0: LEDITS++'s quantile masks keep every element, so the output is continuous in the
    # UNet's numbers and batched == single holds to float rounding on any CPU (with a quantile threshold a
    # last-bit difference between batch sizes can flip a mask element; the store's batching is tested exactly
    # in test_batched_attention_store_keeps_each_image_apart)
    kw = dict(steps=4, skip=0.25, edit_guidance_scale=8.0, edit_threshold=0.0)
    ed = LeditsEditor(pipe, x, batch=3, **kw)
    a = ed.edit(["a red shape", "a blue shape"], seed=0)
    assert type(pipe.attention_store).__call__ is _batched_store_call  # the batch-correct store is the one in use
    b = ed.edit("a circle", seed=0)
    c = ed.edit(["a red shape", "a blue shape"], seed=1)
    assert ed.inversions == 2 and ed.edits == 3  # one inversion per seed, reused across keywords
    assert a.shape == (3, 3, 32, 32) and torch.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, c, atol=1e-3)  # seeds give different edits
    rec = ed.reconstruct(0)
    assert not torch.allclose(a, rec, atol=1e-3) and not torch.allclose(b, rec, atol=1e-3)  # edits edit
    torch.testing.assert_close(ed.edit(["a red shape", "a blue shape"], seed=0), a)  # deterministic
    # batch-correct: each image edited alone (its own inversion, same per-image seed) gives the same edit
    for i in (0, 2):
        one = LeditsEditor(pipe, x[i:i + 1], ids=[i], batch=1, **kw)
        torch.testing.assert_close(one.edit(["a red shape", "a blue shape"], seed=0), a[i:i + 1], atol=2e-4, rtol=0)


def test_batched_attention_store_keeps_each_image_apart():
    """The cross-attention maps LEDITS++ builds its masks from: batched == each image alone (the library's
    own store mixes images and heads once both exceed one, which this test also shows)."""
    from diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion import LeditsAttentionStore

    from featinv.explain.ledits import _batched_store_call

    n, heads, q, k, edits = 3, 2, 4, 5, 2
    attn = torch.randn(1 + edits, n, heads, q, k, generator=torch.Generator().manual_seed(0))  # (uncond+edits, image, head)

    def maps(call, a):  # (images, edits, 2, 2, k): head-averaged maps at 2x2, as the pipeline reads them
        store = LeditsAttentionStore(average=True, batch_size=a.shape[1], max_size=q, max_resolution=None)
        call(store, a.reshape(-1, q, k), True, "down", edits)
        store.between_steps()
        att = store.get_attention(None)
        return torch.stack([store.aggregate_attention(att, ["p"] * edits, 2, ["down"], True, j)
                            for j in range(edits)], 1)

    alone = torch.cat([maps(LeditsAttentionStore.__call__, attn[:, i:i + 1]) for i in range(n)])
    torch.testing.assert_close(maps(_batched_store_call, attn), alone, atol=0, rtol=0)
    assert not torch.allclose(maps(LeditsAttentionStore.__call__, attn), alone, atol=1e-2)


def test_ledits_refuses_ddim_inversion_of_a_v_prediction_prior(tiny_sd_dir, tmp_path):
    import json
    import shutil

    from featinv.explain.ledits import load_ledits_pipeline

    v = shutil.copytree(tiny_sd_dir, tmp_path / "v-sd")
    cfg = v / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="epsilon-prediction"):  # diffusers' DDIM inversion reads the output as eps
        load_ledits_pipeline(v, scheduler="ddim")
    assert load_ledits_pipeline(v).scheduler.config.prediction_type == "v_prediction"  # DPM-Solver++ converts


class ColourProbe(nn.Module):
    """A planted classifier over the single-object scenes: the reader's colour logits."""

    def __init__(self):
        super().__init__()
        from featinv.zoo.shapes.reader import load_reader

        self.net = load_reader()

    def forward(self, x):
        return self.net.predict(x.float().clamp(0, 1))["color"]


def test_diffex_module_ledits_records_and_resume(tmp_path, tiny_sd_dir):
    from featinv.callbacks import PredictionWriter, RunLogger
    from featinv.data import TargetDataModule
    from featinv.explain.modules import ClassifierTargets, DiffExModule

    hier = tmp_path / "h.yaml"
    hier.write_text("categories:\n  color:\n    template: 'a {} shape'\n    items: {warm: [red], cool: [blue]}\n"
                    "  size:\n    template: 'a {} shape'\n    items: {small: [small]}\n")

    def run(out="out", **kw):
        m = DiffExModule(sd=str(tiny_sd_dir), hierarchy=str(hier), split="val", n_images=3, seeds=[0], beam_size=2,
                         top_k=2, steps=3, skip=0.25, classifiers={"colour": ColourProbe()}, examples=3, **kw)
        trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            callbacks=[PredictionWriter(tmp_path / out), RunLogger()])
        dm = TargetDataModule([ClassifierTargets(["colour:0", "colour:4"], name="probe")], batch_size=1)
        trainer.predict(m, datamodule=dm, return_predictions=False)
        return m

    m = run()
    # one inversion; three prompt sets (each item shares its only keyword's edit), reused by the 2nd classifier
    assert m.editor.inversions == 1 and m.editor.edits == 3
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {(r["classifier"], r["method"]) for r in recs} == {(c, k) for c in ("colour:0", "colour:4")
                                                              for k in ("diffex", "oracle")}
    by = {(r["classifier"], r["method"]): r for r in recs}
    assert by[("colour:0", "oracle")]["top_keyword"] == "color/warm/red"
    assert by[("colour:4", "oracle")]["top_keyword"] == "color/cool/blue"
    d = by[("colour:0", "diffex")]
    assert set(d["all_leaves"]) == {"color/warm/red", "color/cool/blue", "size/small/small"}
    assert 0 <= d["edit_success"] <= 1 and 0 <= d["edit_leakage"] <= 1 and d["edits"] > 0
    assert d["true_child"] == "color/warm/red" and d["true_parent"] == "color/warm"
    assert d["spearman"] is None or -1 <= d["spearman"] <= 1
    assert (tmp_path / "out" / "plots" / "diffex_colour:0.png").is_file()
    assert len(list((tmp_path / "out" / "grids").glob("*.png"))) == 2
    m2 = run()  # resume: both classifiers' records are there; nothing is inverted or edited
    assert m2.editor.inversions == 0 and m2.editor.edits == 0
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 4
    m3 = run("ctx", context=True)  # in-context edits: the scenes captioned by the reader, one inversion per scene
    assert m3.editor.captions == W.captions(m3.rows) and m3.editor.inversions == 3
    assert m3.method_configs()["diffex"]["context"] is True
    odd = tmp_path / "odd.yaml"  # prompts outside the grammar cannot go into a caption: refused at construction
    odd.write_text("categories:\n  color:\n    template: 'the {} thing'\n    items: {warm: [red]}\n")
    with pytest.raises(ValueError, match="context=False"):
        DiffExModule(sd=str(tiny_sd_dir), hierarchy=str(odd), split="val", n_images=3, context=True,
                     classifiers={"colour": ColourProbe()})


def test_ledits_in_context_edits_use_each_caption_as_source_and_base(tiny_sd_dir):
    """In-context edits: the inversion runs the UNet on the image's caption only (eps(caption), the base the
    edit then uses; the library's invert() would also run it on "" and guide the caption the wrong way round),
    the edit's base is the caption, and each image's edit prompt is its own caption with the keyword put in."""
    from featinv.explain.ledits import LeditsEditor, load_ledits_pipeline

    pipe = load_ledits_pipeline(tiny_sd_dir)
    x, rows = W.load_split("single", "val", 2)
    caps, seen, calls = W.captions(rows), [], []

    def rewrite(prompt, caption):
        seen.append((prompt, caption))
        return SO.rewrite_caption(prompt, caption)

    def embed(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    forward = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: calls.append(k["encoder_hidden_states"].detach().clone()) or forward(*a, **k)
    kw = dict(steps=4, skip=0.25, edit_guidance_scale=8.0, edit_threshold=0.0)
    ctx = LeditsEditor(pipe, x, captions=caps, rewrite=rewrite, **kw)
    with torch.no_grad():
        ctx._restore(0, 1)  # invert image 1 alone
        assert calls and all(torch.equal(c, embed([caps[1]])) for c in calls)
        calls.clear()
        e = ctx.edit("a star", seed=0)
        assert seen == [("a star", caps[0]), ("a star", caps[1])] and ctx.config()["context"] is True
        star = [SO.rewrite_caption("a star", c) for c in caps]
        assert all(torch.equal(c, torch.cat([embed([caps[1]]), embed([star[1]])])) for c in calls[-3:])
    pipe.unet.forward = forward
    plain = LeditsEditor(pipe, x, **kw)
    assert not torch.allclose(e, plain.edit("a star", seed=0), atol=1e-3)  # the base and the prompt differ
    with pytest.raises(ValueError, match="both captions and rewrite"):
        LeditsEditor(pipe, x, captions=caps)


def test_unmasked_unit_guidance_edit_samples_the_edited_caption_from_the_noise_maps(tiny_sd_dir):
    """edit_threshold=0, edit_guidance_scale=1: eps(caption) + (eps(edited) - eps(caption)) = eps(edited), i.e.
    the edited caption sampled from the caption's inversion (Huberman-Spiegelglas et al.'s edit); a mask that
    kept less than everything would make the two differ."""
    from featinv.explain.ledits import LeditsEditor, load_ledits_pipeline

    pipe = load_ledits_pipeline(tiny_sd_dir)
    x, rows = W.load_split("single", "val", 1)
    caps = W.captions(rows)
    ed = LeditsEditor(pipe, x, captions=caps, rewrite=SO.rewrite_caption, steps=4, skip=0.25,
                      edit_guidance_scale=1.0, edit_threshold=0.0)
    e = ed.edit("a star", seed=0)
    star = SO.rewrite_caption("a star", caps[0])
    ed._restore(0, 0)
    with torch.no_grad():
        direct = pipe(editing_prompt=[star], negative_prompt=star, edit_guidance_scale=1.0, edit_threshold=0.0,
                      output_type="pt").images.float().clamp(0, 1)
    torch.testing.assert_close(e, direct, atol=1e-4, rtol=0)
    assert not torch.allclose(e, ed.reconstruct(0), atol=1e-3)  # and it is an edit
    # combine="mean": K prompts each at scale / K (one prompt: unchanged); "sum": each at the full scale
    kw = dict(steps=4, skip=0.25, edit_threshold=0.0)
    two = ["a red shape", "a blue shape"]
    mean = LeditsEditor(pipe, x, combine="mean", edit_guidance_scale=4.0, **kw)
    torch.testing.assert_close(mean.edit(two), LeditsEditor(pipe, x, edit_guidance_scale=2.0, **kw).edit(two))
    assert not torch.allclose(mean.edit(two), LeditsEditor(pipe, x, edit_guidance_scale=4.0, **kw).edit(two), atol=1e-3)
    torch.testing.assert_close(mean.edit("a star"), LeditsEditor(pipe, x, edit_guidance_scale=4.0, **kw).edit("a star"))
    assert mean.config()["combine"] == "mean"
    with pytest.raises(ValueError, match="combine"):
        LeditsEditor(pipe, x, combine="max")
    for bad in (dict(edit_threshold=1.5), dict(edit_guidance_scale=0.0), dict(steps=0)):
        with pytest.raises(ValueError, match="LEDITS\\+\\+ needs"):
            LeditsEditor(pipe, x, **bad)


def test_captions_parse_back_and_keywords_go_into_them():
    rows = W.sample_rows(200, 3)
    for c, r in zip(W.captions(rows), rows):
        p = SO.parse_caption(c)
        assert all(p[f] == r[f] for f in W.FACTORS)
    cap = "a small red circle at the top left on a gray background"
    assert SO.rewrite_caption("a star", cap) == "a small red star at the top left on a gray background"
    assert SO.rewrite_caption("a shape in the center", cap) == "a small red circle in the center on a gray background"
    assert SO.rewrite_caption("a shape on a dark blue background", cap).endswith("on a dark blue background")
    assert SO.rewrite_caption("a large shape", cap).startswith("a large red circle")
    with pytest.raises(ValueError):
        SO.parse_caption("a red circle")
    with pytest.raises(KeyError):
        SO.rewrite_caption("a red circle", cap)


def test_ledits_cross_attention_masks_sum_over_the_padded_prompt(tiny_sd_dir):
    """What featinv.explain.ledits documents and keeps: the pipeline's per-concept token count is the padded
    length, so LEDITS++'s cross-attention masks sum over every token position whatever the prompt's length. If a
    diffusers / transformers upgrade changes this, the masks (and the chosen hyper-parameters) change."""
    from featinv.explain.ledits import load_ledits_pipeline

    pipe = load_ledits_pipeline(tiny_sd_dir)
    pipe.batch_size = 3
    _, _, counts = pipe.encode_prompt(device="cpu", num_images_per_prompt=1, enable_edit_guidance=True,
                                      editing_prompt=["a star", "a shape on a dark blue background"])
    assert counts.tolist() == [pipe.tokenizer.model_max_length - 2] * 6
