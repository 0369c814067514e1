"""DeSAM: PRIM + PDMM shapes, what trains, the grid-mode sampler and post-processing, promptability, the DG table."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from samadapt.backbones.base import Features
from samadapt.data.preprocessing import PadInfo
from samadapt.errors import ConfigError, InputError
from samadapt.layers.amg import masks_to_boxes, remove_small_regions, select_masks
from samadapt.methods import build_method
from samadapt.layers.sam_decoder import decode_masks
from samadapt.layers.shared_image_decoder import decode_tokens, image_side
from samadapt.methods.desam import PDMM, DeSAM, grid_points
from samadapt.methods.prompting import encode_prompts
from support import SMALL, make_method, square_batch, train_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(backbone, **options) -> DeSAM:
    return make_method("desam", backbone, **options)


def batch_for(backbone, b=2, seed=0):
    return square_batch([(1, 16, 44, 12, 40)], b, backbone.input_size, seed)


# --- structure and shapes ---------------------------------------------------------------------------------------
def test_shapes_grid_and_box(tiny_backbone):
    batch = batch_for(tiny_backbone)
    low = tiny_backbone.low_res_size
    for mode in ("grid", "box"):
        m = make(tiny_backbone, mode=mode)
        out = m(batch)
        assert out["logits"].shape == (2, 1, low, low)
        assert out["iou"].shape == (2, 1)
        assert ("iou_target" in out) == (mode == "grid")
        terms = m.loss(out, batch)
        assert ("iou" in terms) == (mode == "grid")
        assert torch.isfinite(terms["loss"])
        m.eval()
        probs = m.predict({"image": batch["image"]})
        assert probs.shape == (2, 2, tiny_backbone.input_size, tiny_backbone.input_size)
        assert torch.allclose(probs.sum(dim=1), torch.ones(2, 64, 64), atol=1e-5)


def test_pdmm_widths_come_from_the_backbone(tiny_backbone):
    bb = copy.deepcopy(tiny_backbone)
    m = make(bb)
    # f_a -> ctx2, f_b -> ctx1, f_c -> ctx0 take the backbone's widths as input channels
    assert m.pdmm.ctx2.block.conv1.conv.weight.shape[1] == bb.intermediate_widths[0]
    assert m.pdmm.ctx0.block.conv1.conv.weight.shape[1] == bb.intermediate_widths[2]
    assert m.pdmm.fuse.conv1.conv.weight.shape[1] == bb.embed_dim + 32


@pytest.mark.parametrize("sizes, stages", [((16, 16, 16), (2, 1, 0)), ((64, 32, 16), (0, 0, 0)),
                                           ((32, 32, 32), (1, 0, 0))])
def test_pdmm_context_paths_adapt_to_map_sizes(sizes, stages):
    grid = (16, 16)
    pdmm = PDMM((8, 12, 20), [(s, s) for s in sizes], 32, grid, (16, 8, 4), se_reduction=4)
    assert (len(pdmm.ctx2.stages), len(pdmm.ctx1.stages), len(pdmm.ctx0.stages)) == stages
    maps = [torch.randn(2, c, s, s) for c, s in zip((8, 12, 20), sizes)]
    ctx = pdmm.context(maps)
    assert [tuple(t.shape[-2:]) for t in ctx] == [(16, 16), (32, 32), (64, 64)]
    assert pdmm(torch.randn(2, 32, 16, 16), maps).shape == (2, 1, 64, 64)


def test_pdmm_non_power_of_two_maps_are_resized_and_wrong_sizes_fail():
    pdmm = PDMM((8, 8, 8), [(24, 24)] * 3, 32, (16, 16), (16, 8, 4), se_reduction=4)
    assert pdmm.ctx2.resize and pdmm.ctx0.resize and len(pdmm.ctx2.stages) == 0
    maps = [torch.randn(1, 8, 24, 24) for _ in range(3)]
    assert pdmm(torch.randn(1, 32, 16, 16), maps).shape == (1, 1, 64, 64)
    with pytest.raises(InputError, match="intermediate_sizes"):
        pdmm.context([torch.randn(1, 8, 16, 16) for _ in range(3)])


def test_config_errors(tiny_backbone):
    with pytest.raises(ConfigError):
        make(tiny_backbone, mode="everything")
    with pytest.raises(ConfigError):
        make(tiny_backbone, iou_loss="huber")
    with pytest.raises(ConfigError):
        build_method("desam", tiny_backbone, {"no_such_option": 1})


# --- what trains --------------------------------------------------------------------------------------------------
def test_gradients_reach_only_prim_and_pdmm(tiny_backbone):
    bb = copy.deepcopy(tiny_backbone)
    m = make(bb)
    names = [n for n, _ in m.trainable_parameters()]
    assert names and all(n.startswith(("prim.", "pdmm.")) for n in names)
    assert not any(n.startswith(("prim.output_upscaling", "prim.output_hypernetworks_mlps")) for n in names)
    assert any(n.startswith("prim.transformer") for n in names) and any("iou_prediction_head" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in m.trainable_parameters()}
    opt = torch.optim.Adam([p for _, p in m.trainable_parameters()], lr=1e-2)
    batch = batch_for(bb)
    m.loss(m(batch), batch)["loss"].backward()
    for n, p in m.named_parameters():
        if n.startswith("backbone.") or n.startswith(("prim.output_upscaling", "prim.output_hypernetworks_mlps")):
            assert p.grad is None, n
    grads = {n: p.grad for n, p in m.trainable_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["prim.iou_prediction_head.layers.0.weight"].abs().sum() > 0
    assert grads["pdmm.head.weight"].abs().sum() > 0
    assert grads["prim.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].abs().sum() > 0
    opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert not torch.equal(dict(m.named_parameters())["pdmm.head.weight"], trained["pdmm.head.weight"])


def test_checkpoint_holds_prim_and_pdmm_only(tiny_backbone):
    from samadapt.engine.checkpoint import adapter_state

    keys = adapter_state(make(tiny_backbone))
    assert keys and all(k.startswith(("prim.", "pdmm.")) for k in keys)
    assert not any(k.startswith("prim.output_upscaling") for k in keys)


# --- grid-mode training sampler and loss -----------------------------------------------------------------------------
def test_sampler_background_foreground_and_iou_target(tiny_backbone):
    m = make(tiny_backbone)
    label = torch.zeros(3, 64, 64, dtype=torch.long)
    label[:, 10:20, 30:50] = 1
    label[2] = 0  # no foreground: falls back to a background point
    for prob, expect in ((1.0, 0.0), (0.0, 1.0)):
        m.config.bg_point_prob = prob
        coords, target = m.sample_points(label, {}, torch.Generator().manual_seed(1))
        assert coords.shape == (3, 1, 2) and target.shape == (3, 1)
        for i in range(3):
            x, y = (int(v) for v in coords[i, 0])
            inside = bool(label[i, y, x])
            assert float(target[i, 0]) == float(inside)
            if i < 2:
                assert float(target[i, 0]) == expect
        assert float(target[2, 0]) == 0.0


def test_sampler_keeps_background_points_inside_the_unpadded_region(tiny_backbone):
    m = make(tiny_backbone, bg_point_prob=1.0)
    label = torch.zeros(8, 64, 64, dtype=torch.long)
    label[:, 5:10, 5:10] = 1
    pad = [PadInfo(100, 50, 64, 32, 64)] * 8  # image fills the left 32 columns only
    coords, target = m.sample_points(label, {"pad": pad}, torch.Generator().manual_seed(0))
    assert (coords[..., 0] < 32).all() and (target == 0).all()


def test_mask_target_is_the_full_ground_truth_whatever_the_point(tiny_backbone):
    from monai.losses import DiceCELoss

    m = make(tiny_backbone, bg_point_prob=1.0)
    batch = batch_for(tiny_backbone)
    out = m(batch)
    assert (out["iou_target"] == 0).all()
    terms = m.loss(out, batch)
    expected = DiceCELoss(sigmoid=True, squared_pred=True)(out["logits"], (batch["label"] > 0).float()[:, None])
    assert torch.allclose(terms["dice_ce"], expected)
    assert torch.allclose(terms["iou"], out["iou"].abs().mean())
    assert torch.allclose(terms["loss"], terms["dice_ce"] + terms["iou"])


def test_eval_forward_is_deterministic_training_forward_is_not(tiny_backbone):
    m = make(tiny_backbone)
    batch = batch_for(tiny_backbone, b=4)
    batch["features"] = m.features(batch)
    m.eval()
    a, b = m(batch)["iou_target"], m(batch)["iou_target"]
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(0)
    draws = {tuple(m(batch)["iou_target"].flatten().tolist()) for _ in range(3)}
    assert len(draws) > 1


# --- grid-mode post-processing on constructed cases ---------------------------------------------------------------
def _square(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1.0
    return m


def test_select_masks_nms_keeps_the_best_of_duplicates():
    a = _square(32, 32, 2, 12, 2, 12)
    a_dup = _square(32, 32, 2, 12, 2, 13)  # box IoU ~0.9 with a
    b = _square(32, 32, 20, 30, 20, 30)
    probs = torch.stack([a_dup, a, b]) * 0.9
    sel = select_masks(probs, torch.tensor([0.8, 0.9, 0.7]), top_k=3, min_area=0)
    assert sel.indices.tolist() == [1, 2]  # a_dup suppressed by a; b kept
    assert not sel.complete  # fewer than top_k survived
    sel = select_masks(probs, torch.tensor([0.8, 0.9, 0.7]), top_k=3, min_area=0, nms_thresh=0.95)
    assert sel.indices.tolist() == [1, 0, 2] and sel.complete


def test_select_masks_score_threshold_and_binarisation():
    a = _square(32, 32, 2, 12, 2, 12)
    sel = select_masks(torch.stack([a * 0.9, a * 0.4]), torch.tensor([0.4, 0.95]), score_thresh=0.5, min_area=0)
    assert len(sel.indices) == 0  # first under the IoU threshold, second below sigmoid 0.5 -> empty
    sel = select_masks(torch.stack([a * 0.9]), torch.tensor([0.6]), score_thresh=0.5, min_area=0)
    assert sel.indices.tolist() == [0] and sel.masks[0].sum() == 100


def test_remove_small_regions_islands_and_holes():
    m = np.zeros((40, 40), dtype=bool)
    m[5:25, 5:25] = True
    m[10:12, 10:12] = False  # hole of 4 px
    m[32:34, 32:34] = True  # island of 4 px
    out = remove_small_regions(m, 10)
    assert out[10:12, 10:12].all() and not out[32:34, 32:34].any() and out.sum() == 400
    lone = np.zeros((40, 40), dtype=bool)
    lone[1:3, 1:3] = True
    lone[20:23, 20:23] = True
    kept = remove_small_regions(lone, 100)  # every island small: SAM keeps the largest
    assert kept.sum() == 9 and kept[20:23, 20:23].all()


def test_select_masks_area_filter_applies_to_the_kept_mask():
    a = _square(40, 40, 5, 25, 5, 25)
    a[32:34, 32:34] = 1.0
    sel = select_masks(a[None] * 0.9, torch.tensor([0.9]), min_area=10)
    assert sel.masks[0].sum() == 400


def test_masks_to_boxes_empty_and_full():
    m = torch.zeros(2, 8, 8, dtype=torch.bool)
    m[1, 2:5, 3:7] = True
    assert masks_to_boxes(m).tolist() == [[0, 0, 0, 0], [3, 2, 6, 4]]


def test_grid_points_cover_cell_centres():
    pts = grid_points(2, 10, 20)
    assert pts.tolist() == [[5.0, 2.5], [15.0, 2.5], [5.0, 7.5], [15.0, 7.5]]


def test_grid_inference_empty_when_no_point_passes_the_iou_filter(tiny_backbone):
    m = make(tiny_backbone, pred_iou_thresh=1e6).eval()
    probs = m.predict({"image": batch_for(tiny_backbone)["image"]})
    assert (probs[:, 1] == 0).all() and (probs[:, 0] == 1).all()
    assert m.last_grid["candidates"] == 0 and m.last_grid["decoded"] == 0


def test_select_masks_on_the_best_candidates_equals_all_once_complete():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        n = 12
        probs = torch.zeros(n, 32, 32)
        for i in range(n):
            y, x = (int(v) for v in torch.randint(0, 24, (2,), generator=g))
            size = int(torch.randint(2, 9, (1,), generator=g))
            probs[i, y:y + size, x:x + size] = 0.9
        scores = torch.sort(torch.rand(n, generator=g), descending=True).values
        kwargs = dict(score_thresh=0.2, top_k=3, nms_thresh=0.3, min_area=5)
        full = select_masks(probs, scores, **kwargs)
        for k in range(1, n + 1):
            part = select_masks(probs[:k], scores[:k], **kwargs)
            if part.complete:
                assert part.indices.tolist() == full.indices.tolist(), seed
                assert torch.equal(part.masks, full.masks)
                break


def test_grid_inference_decodes_lazily_with_the_same_result(tiny_backbone):
    m = make(tiny_backbone, pred_iou_thresh=-1e6, points_per_side=3, points_per_batch=9).eval()
    feats = m.features(batch_for(tiny_backbone, b=1))
    lazy = m.grid_masks(feats)[0]
    assert m.last_grid["candidates"] == 9 and m.last_grid["decoded"] < 9
    with torch.no_grad():  # the whole pipeline by hand: every point decoded, then post-processed
        coords = grid_points(3, 64, 64)
        labels = torch.ones(9, 1)
        sparse, dense = encode_prompts(tiny_backbone, points=(coords[:, None], labels), boxes=None)
        iou, emb = m.prim_forward(feats.embedding.expand(9, -1, -1, -1), sparse, dense)
        iou = iou[:, 0]
        logits = m.pdmm.decode(emb, m.pdmm.context(feats.intermediates), torch.zeros(9, dtype=torch.long))[:, 0]
    sel = select_masks(torch.sigmoid(logits), iou, score_thresh=-1e6, min_area=4, top_k=1)
    expected = sel.masks[0] if len(sel.masks) else torch.zeros(64, 64, dtype=torch.bool)
    assert torch.equal(lazy, expected)


def test_shared_image_prim_equals_sam_decoder_on_repeated_embeddings(tiny_backbone):
    m = make(tiny_backbone).eval()
    feats = m.features(batch_for(tiny_backbone, b=2))
    coords = torch.rand(5, 1, 2, generator=torch.Generator().manual_seed(1)) * 64
    sparse, dense = encode_prompts(tiny_backbone, points=(coords, torch.ones(5, 1)), boxes=None)
    index = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        ref = decode_masks(m.prim, feats.embedding[index], tiny_backbone.prompt_encoder.get_dense_pe(), sparse, dense)
        side = image_side(m.prim, feats.embedding, tiny_backbone.prompt_encoder.get_dense_pe(), dense[:1])
        iou, tokens, image_tokens = decode_tokens(m.prim, side, sparse, index)
    assert torch.allclose(iou, ref.iou, atol=1e-5) and torch.allclose(tokens, ref.tokens, atol=1e-5)
    assert torch.allclose(image_tokens, ref.image_tokens, atol=1e-5)
    with torch.no_grad():  # only the IoU token through the final attention: same IoU and image tokens
        iou_only, first, image_only = decode_tokens(m.prim, side, sparse, index, iou_only=True)
    # allclose, not equal: a one-token matmul may take another CPU kernel than the full one (AVX512/AMX blocking)
    assert torch.allclose(iou_only, iou, atol=1e-6) and torch.allclose(image_only, image_tokens, atol=1e-6)
    assert first.shape == (5, 1, tokens.shape[-1]) and torch.allclose(first, tokens[:, :1], atol=1e-6)


def test_batched_grid_prompts_equal_one_by_one(tiny_backbone, monkeypatch):
    m = make(tiny_backbone, pred_iou_thresh=-1e6, points_per_side=3, prim_batch=18).eval()
    feats = m.features(batch_for(tiny_backbone, b=3))
    calls = []
    prim = m._prim_points
    monkeypatch.setattr(m, "_prim_points", lambda side, c, i: calls.append(len(c)) or prim(side, c, i))
    batched = m.grid_masks(feats)
    assert calls == [18, 9]  # two whole slices per call, then the third
    scores_last = m.last_grid["scores"]
    pe = tiny_backbone.prompt_encoder.get_dense_pe()
    with torch.no_grad():  # one point at a time through SAM's own decoder (decode_masks), then the same selection
        ones = []
        for i in range(3):
            emb = feats.embedding[i:i + 1]
            context = m.pdmm.context([f[i:i + 1] for f in feats.intermediates])
            scores, embs = [], []
            for c in grid_points(3, 64, 64):
                sparse, dense = encode_prompts(tiny_backbone, points=(c.view(1, 1, 2), torch.ones(1, 1)), boxes=None)
                ref = decode_masks(m.prim, emb, pe, sparse, dense)
                scores.append(ref.iou[0, 0])
                embs.append(ref.image_tokens)
            scores = torch.stack(scores)
            ones.append(m._decode_candidates(scores, torch.arange(9), torch.cat(embs), context, 0))
    assert torch.allclose(scores, scores_last, atol=1e-5)
    assert torch.equal(batched, torch.stack(ones))
    assert m.last_grid["candidates"] == 9


def test_grid_inference_keeps_only_embeddings_over_the_iou_threshold(tiny_backbone):
    m = make(tiny_backbone, points_per_side=3).eval()
    feats = m.features(batch_for(tiny_backbone, b=1))
    m.grid_masks(feats)
    scores = m.last_grid["scores"]
    m.config.pred_iou_thresh = float(scores.median())
    side = image_side(m.prim, feats.embedding, tiny_backbone.prompt_encoder.get_dense_pe(),
                      encode_prompts(tiny_backbone, points=(torch.zeros(1, 1, 2), torch.ones(1, 1)), boxes=None)[1])
    all_scores, passing, embeddings = m._score_points(side, grid_points(3, 64, 64), torch.zeros(9, dtype=torch.long))
    assert torch.equal(passing, torch.nonzero(all_scores > m.config.pred_iou_thresh)[:, 0])
    assert 0 < len(passing) < 9 and embeddings.shape[0] == len(passing)


def test_grid_inference_picks_the_highest_iou_point(tiny_backbone, monkeypatch):
    m = make(tiny_backbone, points_per_side=3, points_per_batch=9, min_mask_region_area=0).eval()
    feats = m.features(batch_for(tiny_backbone, b=1))
    calls = []

    def fake_prim(side, coords, index):  # IoU = x coordinate; M encodes the point's x so that the decode is traceable
        calls.append(coords.clone())
        m_emb = coords[:, :1, None, None].expand(-1, 256, 16, 16).clone()
        return coords[:, 0] / 100.0, m_emb

    def fake_decode(m_emb, context, index=None):  # the mask: columns left of the point's x
        xs = torch.arange(64.0)
        return ((m_emb[:, :1, :1, :1] > xs.view(1, 1, 1, 64)).float() * 20 - 10).expand(-1, 1, 64, 64)

    monkeypatch.setattr(m, "_prim_points", fake_prim)
    monkeypatch.setattr(m.pdmm, "decode", fake_decode)
    m.config.pred_iou_thresh = 0.3
    mask = m.grid_masks(feats)[0]
    best_x = max(float(c[:, 0].max()) for c in calls)
    assert mask.shape == (64, 64) and mask[:, : int(best_x)].all() and not mask[:, int(best_x) + 1:].any()


# --- promptable -----------------------------------------------------------------------------------------------------
def test_predict_uses_user_points_and_boxes(tiny_backbone):
    m = make(tiny_backbone).eval()
    image = batch_for(tiny_backbone)["image"]
    p1 = m.predict({"image": image, "points": torch.tensor([[[10.0, 10.0]]] * 2),
                    "point_labels": torch.ones(2, 1)})
    p2 = m.predict({"image": image, "points": torch.tensor([[[50.0, 40.0]]] * 2),
                    "point_labels": torch.ones(2, 1)})
    pb = m.predict({"image": image, "boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]] * 2)})
    for p in (p1, p2, pb):
        assert p.shape == (2, 2, 64, 64) and 0 < float(p[:, 1].mean()) < 1  # soft sigmoid, not a grid result
    assert not torch.allclose(p1, p2) and not torch.allclose(p1, pb)
    with pytest.raises(InputError):
        m.predict({"image": image, "points": torch.zeros(2, 2), "point_labels": torch.ones(2, 1)})


def test_box_mode_uses_the_unpadded_whole_box(tiny_backbone):
    m = make(tiny_backbone, mode="box")
    boxes = m._whole_boxes({"pad": [PadInfo(10, 20, 32, 64, 64)]}, 1, torch.device("cpu"))
    assert boxes.tolist() == [[0.0, 0.0, 63.0, 31.0]]
    assert m._whole_boxes({}, 2, torch.device("cpu")).tolist() == [[0.0, 0.0, 63.0, 63.0]] * 2


def test_cached_features_without_intermediates_fail_clearly(tiny_backbone):
    m = make(tiny_backbone, mode="box")
    feats = Features(torch.randn(1, 256, 16, 16), [])
    with pytest.raises(InputError, match="intermediate"):
        m({"features": feats, "image": torch.rand(1, 3, 64, 64)})


def test_multi_class_runs_one_vs_rest(tiny_backbone):
    m = make_method("desam", tiny_backbone, 2)
    batch = batch_for(tiny_backbone)
    batch["label"][:, 40:50, 40:50] = 2
    terms = m.loss(m(batch), batch)
    assert "class2_iou" in terms and torch.isfinite(terms["loss"])


def test_loss_falls_on_a_fixed_batch(tiny_backbone):
    m = make(tiny_backbone, mode="box")
    batch = batch_for(tiny_backbone)
    batch["features"] = m.features(batch)
    opt = torch.optim.Adam([p for _, p in m.trainable_parameters()], lr=3e-3)
    losses = train_steps(m, batch, opt, 8)
    assert losses[-1] < 0.7 * losses[0]


# --- the domain-generalisation table -------------------------------------------------------------------------------
def _discs(root, n=8, invert=False, classes=1, seed=0):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :56]
    for i in range(n):
        cy, cx, r = rng.integers(18, 30), rng.integers(18, 38), rng.integers(6, 12)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = 40 + 150 * mask + rng.normal(0, 8, mask.shape)
        img = (255 - img) if invert else img
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"c{i:02d}.png")
        label = mask.astype(np.uint8) * 255
        if classes == 2:  # left half of the disc is class 1, right half class 2 (masks stored as class ids)
            label = mask.astype(np.uint8) * np.where(xx < cx, 1, 2).astype(np.uint8)
        Image.fromarray(label).save(root / "masks" / f"c{i:02d}.png")
    if classes == 2:
        import json

        (root / "labels.json").write_text(json.dumps({"labels": {"background": 0, "left": 1, "right": 2}}))
    return root


def test_domain_generalisation_table(tmp_path):
    import json

    from samadapt.config.run_config import load_config
    from samadapt.engine.run import train
    from samadapt.evaluation.protocols.domain_generalisation import TABLE_COLUMNS, evaluate_domain_generalisation

    source = _discs(tmp_path / "source")
    inverted = _discs(tmp_path / "inverted", n=3, invert=True, seed=1)
    two_class = _discs(tmp_path / "twoclass", n=3, classes=2, seed=2)
    options = [f"method.options.{k}={json.dumps(v)}" for k, v in SMALL["desam"].items()]
    cfg = load_config(None, ["backbone.name=tiny", "method.name=desam", *options,
                             f"data.path={source}", "data.cache=off", "data.empty_ratio=null", "train.epochs=1",
                             "train.batch_size=4", "train.device=cpu", f"output={tmp_path / 'run'}"])
    train(cfg)
    out = tmp_path / "dg"
    rows = evaluate_domain_generalisation(tmp_path / "run", [str(inverted), f"two={two_class}"], out,
                                          modes=["grid", "box"], device="cpu", use_cache=False)
    assert [(r["target"], r["domain"], r["mode"]) for r in rows] == [
        ("source (source)", "source", "grid"), ("inverted", "target", "grid"), ("two", "target", "grid"),
        ("source (source)", "source", "box"), ("inverted", "target", "box"), ("two", "target", "box")]
    assert [r["labels"] for r in rows[:3]] == ["same", "same", "any>0"]
    assert rows[1]["cases"] == 3 and rows[0]["cases"] >= 1
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    assert (out / "dg_table.md").is_file() and (out / "dg_per_case.csv").is_file()
    table = json.loads((out / "dg_table.json").read_text())
    assert len(table["rows"]) == 6 and set(table["rows"][0]) == set(TABLE_COLUMNS)
    with pytest.raises(InputError, match="no such dataset"):
        evaluate_domain_generalisation(tmp_path / "run", ["no-such-target"], device="cpu", use_cache=False)
    from samadapt.evaluation.protocols.domain_generalisation import resolve_target

    assert resolve_target(f"x={source}", tmp_path) == ("x", source)


# --- integration: real LiteMedSAM weights, real MNI152 slices, features from the embedding cache ------------------
@pytest.mark.integration
def test_litemedsam_training_from_the_cache_reduces_the_loss(litemedsam_backbone, real_brain_batch, tmp_path):
    from samadapt.engine.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache", litemedsam_backbone, intermediates=True)
    batch = {"image": real_brain_batch["image"], "label": real_brain_batch["label"],
             "key": real_brain_batch["key"], "pad": real_brain_batch["pad"]}
    batch["features"] = cache.get_or_compute(batch["key"], batch["image"])
    assert [tuple(t.shape[1:]) for t in batch["features"].intermediates] == [(160, 64, 64), (320, 64, 64),
                                                                             (320, 64, 64)]
    assert cache.get_or_compute(batch["key"], batch["image"]) is not None and cache.hits >= 4  # read back
    torch.manual_seed(0)
    m = build_method("desam", litemedsam_backbone, {"channels": [64, 32, 16], "points_per_side": 2})
    opt = torch.optim.Adam([p for _, p in m.trainable_parameters()], lr=1e-3)
    train_batch = {"features": batch["features"].index(slice(0, 4, 2)), "label": batch["label"][::2],
                   "pad": batch["pad"][::2]}

    def eval_loss() -> float:  # fixed points in eval mode: a deterministic measure
        m.eval()
        with torch.no_grad():
            value = float(m.loss(m(train_batch), train_batch)["loss"])
        m.train()
        return value

    before = eval_loss()
    for _ in range(8):
        terms = m.loss(m(train_batch), train_batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    after = eval_loss()
    assert after < 0.85 * before, (before, after)
    m.eval()
    probs = m.predict({k: v for k, v in batch.items() if k != "label"})
    assert probs.shape == (4, 2, 256, 256)


def test_validation_modes_score_the_named_cheaper_inference(tiny_backbone, monkeypatch):
    """val_mode grid = predict; coarse = the grid inference on a val_points_per_side grid; box = DeSAM-B's forward;
    training validation (engine.validation.validate) scores validation_predict."""
    from samadapt.engine.validation import validate

    m = make(tiny_backbone, points_per_side=3, val_points_per_side=2, min_mask_region_area=0).eval()
    batch = batch_for(tiny_backbone, b=2)
    image = {"image": batch["image"]}
    grid = m.predict(image)
    assert torch.equal(m.validation_predict(image), grid)
    m.config.val_mode = "coarse"
    coarse = m.validation_predict(image)
    assert len(m.last_grid["scores"]) == 4  # a 2 x 2 grid
    m.config.points_per_side = 2
    assert torch.equal(coarse, m.predict(image))
    m.config.val_mode, m.config.points_per_side = "box", 3
    boxed = m.validation_predict(image)
    m.config.mode = "box"
    assert torch.equal(boxed, m.predict(image))
    m.config.mode = "grid"
    calls = []
    real = m.validation_predict
    monkeypatch.setattr(m, "validation_predict", lambda b: calls.append(len(b["image"])) or real(b))
    items = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    val = validate(m, items, lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]}, lambda b: b, 2, "none",
                   torch.device("cpu"))
    assert calls == [2] and 0 <= val["dice"] <= 1
