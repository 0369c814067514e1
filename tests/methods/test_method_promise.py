"""ProMISe: frozen SAM, APM (ResNet and cross-attention) points inside the image, IPS token shifts, GT points,
user points, loss, opening, plotting; an integration test on LiteMedSAM with real data."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from samadapt.errors import ConfigError, InputError
from samadapt.methods import build_method
from samadapt.methods.promise import (ProMISe, anchor_grid, binary_opening, bce_dice_loss, distance_maps,
                                     parse_point_labels, point_distance_loss,
                                      sample_gt_points)
from support import make_method, square_batch, train_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(backbone, **options) -> ProMISe:
    return make_method("promise", backbone, **options)


@pytest.fixture()
def batch():
    return square_batch([(1, 10, 40, 12, 44, 0), (1, 30, 60, 5, 25, 1)], seed=1)


def sam_state(backbone):
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


VARIANTS = [dict(mode="apm_ips", apm="resnet"), dict(mode="apm_ips", apm="cross"), dict(mode="apm", apm="resnet"),
            dict(mode="apm", apm="cross"), dict(mode="ips_gt")]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(o.values()))
def test_shapes(tiny_backbone, batch, options):
    method = make(tiny_backbone, **options)
    out = method(batch)
    assert out["logits"].shape == (2, 1, 64, 64)  # 4 x the 16 x 16 grid
    assert out["points"].shape == (2, 8, 2) and out["point_labels"].shape == (2, 8)
    method.eval()
    probs = method.predict(batch)
    assert probs.shape == (2, 2, 64, 64)
    assert torch.allclose(probs.sum(1), torch.ones(2, 64, 64), atol=1e-5)
    assert method.last_points.shape == (2, 8, 2) and method.last_point_labels.shape == (2, 8)
    assert method.last_point_source == ("gt" if options["mode"] == "ips_gt" else "apm")


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(o.values()))
def test_sam_frozen_and_modules_train(tiny_backbone, batch, options):
    """Gradients reach APM and IPS through the frozen prompt encoder and decoder, never SAM; an Adam step moves
    only the add-on modules."""
    method = make(tiny_backbone, **options)
    before = sam_state(tiny_backbone)
    names = [n for n, _ in method.trainable_parameters()]
    assert names and all(n.startswith(("apm.", "ips.")) for n in names)
    assert (options["mode"] == "ips_gt") == (method.apm is None)
    assert (options["mode"] == "apm") == (method.ips is None)
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters()], lr=1e-2)
    trained_before = {n: p.detach().clone() for n, p in method.trainable_parameters()}
    method.loss(method(batch), batch)["loss"].backward()
    for p in tiny_backbone.parameters():
        assert not p.requires_grad and (p.grad is None or not p.grad.any())
    for part in (method.apm, method.ips):
        if part is not None:  # the coordinate head and the IPS output layer get a gradient through frozen SAM
            grads = [p.grad for p in part.parameters() if p.grad is not None]
            assert grads and any(g.abs().sum() > 0 for g in grads)
    opt.step()
    for k, v in tiny_backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [n for n, p in method.trainable_parameters() if not torch.equal(p, trained_before[n])]
    assert any(n.startswith("apm.") for n in changed) == (method.apm is not None)
    assert any(n.startswith("ips.") for n in changed) == (method.ips is not None)


def test_param_groups_scale_the_apm_lr(tiny_backbone):
    method = make(tiny_backbone, apm_lr_scale=0.1)
    groups = method.param_groups(1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3])
    assert sum(len(g["params"]) for g in groups) == len(list(method.trainable_parameters()))
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in method.apm.parameters()}
    assert len(make(tiny_backbone, mode="ips_gt").param_groups(1e-3)) == 1


def test_backbone_stays_in_eval_mode(tiny_backbone):
    method = make(tiny_backbone).train()
    assert method.training and method.apm.training and not tiny_backbone.training
    assert not any(m.training for m in tiny_backbone.modules())


@pytest.mark.parametrize("apm", ["resnet", "cross"])
@pytest.mark.parametrize("param", ["anchor", "global", "sigmoid"])
def test_coordinates_inside_image(tiny_backbone, batch, apm, param):
    """Points stay inside [0, S] even when the head is pushed to extreme outputs (``sigmoid`` and ``global`` then
    reach the edges); anchored points stay within
    ``anchor_radius`` cells of their anchor, so they keep 0.1 cell (2.1 px of 64) off the border."""
    method = make(tiny_backbone, apm=apm, point_param=param)
    feats = method.features(batch)
    head = method.apm.head.linear
    with torch.no_grad():
        head.weight.normal_().mul_(1e4)
        head.bias.copy_(torch.linspace(-1e4, 1e4, head.bias.numel()))
    with torch.no_grad():
        coords, labels = method.apm_points(feats)
    assert coords.shape == (2, 8, 2)
    assert coords.min() >= 0 and coords.max() <= 64
    if param != "anchor":
        assert (coords < 1).any() and (coords > 63).any()  # the extremes were reached (global: the whole frame)
    else:
        offset = (coords - method.apm.head.anchors).abs()
        cell = 64 / 3  # 8 points: a 3 x 3 grid
        assert offset.max() == pytest.approx(0.4 * cell, rel=1e-4)  # saturated, and still bounded
        assert coords.min() >= 0.1 * cell - 1e-4 and coords.max() <= 64 - 0.1 * cell + 1e-4


def test_anchor_grid_spreads_both_labels():
    """16 points: the 16 cell centres of a 4 x 4 grid, positives on one checkerboard colour, negatives on the
    other (so neither kind is confined to one half of the image); 8 points use 8 of the 9 cells of a 3 x 3 grid."""
    labels = parse_point_labels(None, 16)
    a = anchor_grid(labels, 256)
    cells = (a / 64 - 0.5).round().long()  # column, row
    assert torch.allclose(a, (cells.float() + 0.5) * 64)
    assert len({tuple(c.tolist()) for c in cells}) == 16
    colour = (cells.sum(1) % 2).tolist()
    assert colour == [0] * 8 + [1] * 8
    rows_pos = {int(c[1]) for c, lab in zip(cells, labels) if lab == 1}
    assert rows_pos == {0, 1, 2, 3}
    b = anchor_grid(parse_point_labels(None, 8), 64)
    assert len({tuple(x.tolist()) for x in b}) == 8 and b.min() > 0 and b.max() < 64


def test_anchor_apm_starts_on_the_grid(tiny_backbone, batch):
    """The zero-initialised head puts every image's points exactly on the anchors at the start."""
    for apm in ("resnet", "cross"):
        method = make(tiny_backbone, apm=apm)
        coords, _ = method.apm_points(method.features(batch))
        assert torch.equal(coords, method.apm.head.anchors.expand(2, -1, -1))
    with pytest.raises(ConfigError, match="point_param"):
        make(tiny_backbone, point_param="softmax")
    with pytest.raises(ConfigError, match="anchor_radius"):
        make(tiny_backbone, anchor_radius=0.8)


def shifted_square_batch(n: int = 4) -> dict:
    """n tiny-backbone images, each with a bright 24 x 24 square (its label) at a different place."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(n, 3, 64, 64, generator=g)
    label = torch.zeros(n, 64, 64, dtype=torch.long)
    for i in range(n):
        x0, y0 = int(torch.randint(0, 36, (1,), generator=g)), int(torch.randint(0, 36, (1,), generator=g))
        label[i, y0:y0 + 24, x0:x0 + 24] = 1
        image[i, :, y0:y0 + 24, x0:x0 + 24] += 0.8
    return {"image": image.clamp(0, 1), "label": label}


def train_apm(backbone, batch, steps: int, lr: float, **options) -> Tensor:
    """APM-only ProMISe trained with Adam on ``batch`` (features computed once); returns its eval-mode points."""
    method = make(backbone, mode="apm", **options)
    batch = dict(batch, features=method.features(batch))
    train_steps(method, batch, torch.optim.Adam(method.param_groups(lr)), steps)
    method.eval()
    with torch.no_grad():
        return method(batch)["points"]


def border_fraction(points: Tensor, size: int = 64) -> float:
    """Share of points within 2 % of the side from an edge."""
    m = 0.02 * size
    return float(((points < m) | (points > size - m)).any(-1).float().mean())


@pytest.mark.parametrize("apm", ["resnet", "cross"])
def test_trained_points_do_not_collapse(tiny_backbone, apm):
    """The collapse: 30 Adam steps at a high lr drive the release's sigmoid coordinates onto the border. Anchored
    points, trained the same way, stay inside the image, off the border, unsaturated, and (ResNet APM, whose points
    come from the whole image's features) differ between images."""
    batch = shifted_square_batch()
    sigmoid = train_apm(tiny_backbone, batch, 30, 3e-2, apm=apm, point_param="sigmoid")
    assert border_fraction(sigmoid) > 0.5  # the failure this guards against, reproduced
    method = make(tiny_backbone, mode="apm", apm=apm)
    anchored = train_apm(tiny_backbone, batch, 30, 3e-2, apm=apm)
    assert anchored.min() >= 0 and anchored.max() <= 64
    assert border_fraction(anchored) == 0.0
    offset = (anchored - method.apm.head.anchors).abs() / method.apm.head.radius
    assert offset.max() > 0.01  # trained away from the grid ...
    assert (offset > 0.99).float().mean() < 0.1  # ... without saturating at the cell edges
    if apm == "resnet":
        spread = anchored.std(dim=0).norm(dim=-1)  # per point, over the images
        assert spread.mean() > 0.02, spread


def test_distance_maps():
    """Channel 0: distance to the foreground (0 on it); channel 1: to the background; in units of the side."""
    label = torch.zeros(2, 64, 64, dtype=torch.long)
    label[0, 20:30, 10:20] = 1  # image 1 has no foreground
    maps = distance_maps(label)
    assert maps.shape == (2, 2, 64, 64)
    assert maps[0, 0, 20:30, 10:20].eq(0).all() and maps[0, 1, label[0] == 0].eq(0).all()
    assert maps[0, 0, 25, 30] == pytest.approx(11 / 64)  # 11 px right of the square's last column
    assert maps[0, 1, 25, 15] == pytest.approx(5 / 64)  # 5 px from the square's nearest edge
    assert maps[1].eq(0).all()  # no side to seek: no pull
    big = torch.zeros(1, 512, 512, dtype=torch.long)
    big[0, 200:300, 100:200] = 1
    assert distance_maps(big).shape[-2:] == (256, 256)


def test_point_distance_loss_pulls_points_to_their_side():
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    label[0, 20:40, 20:40] = 1
    labels = torch.tensor([[1, 0]])
    on_side = torch.tensor([[[30.0, 30.0], [5.0, 5.0]]])  # positive inside, negative outside
    assert point_distance_loss(on_side, labels, label, 64) == 0
    off = torch.tensor([[[50.0, 30.0], [30.0, 30.0]]], requires_grad=True)  # both on the wrong side
    loss = point_distance_loss(off, labels, label, 64)
    assert loss.item() == pytest.approx((10.5 / 64 + 10.5 / 64) / 2, abs=0.02)
    loss.backward()
    assert off.grad[0, 0, 0] > 0 and off.grad[0, 0, 1].abs() < off.grad[0, 0, 0]  # descent moves it left, inwards


def test_point_loss_draws_points_to_their_side(tiny_backbone):
    """With ``point_loss_weight`` (and ``point_param=global``, which lets a point leave its anchor's cell) the
    trained APM's points end up far nearer their side of each image's square than untrained or trained without
    it (the paper: weight 0, where the loss has no such term); they stay inside the image."""
    batch = shifted_square_batch()
    plain = make(tiny_backbone, mode="apm", point_param="global")
    assert "points" not in plain.loss(plain(batch), batch)
    pulled = make(tiny_backbone, mode="apm", point_loss_weight=1.0)
    assert "points" in pulled.loss(pulled(batch), batch)

    labels = plain.apm_labels.expand(4, -1)

    def distance(points: Tensor) -> float:
        return float(point_distance_loss(points, labels, batch["label"], 64))

    with torch.no_grad():
        before = distance(plain(batch)["points"])  # the anchor grid: the zero-initialised head's start
    torch.manual_seed(0)
    without = distance(train_apm(tiny_backbone, batch, 40, 3e-2, point_param="global"))
    torch.manual_seed(0)
    points = train_apm(tiny_backbone, batch, 40, 3e-2, point_param="global", point_loss_weight=10.0)
    assert distance(points) < 0.5 * before and distance(points) < 0.5 * without, (before, without, distance(points))
    assert points.min() > 0 and points.max() < 64
    with pytest.raises(ConfigError, match="point_loss_weight"):
        make(tiny_backbone, mode="ips_gt", point_loss_weight=1.0)


def test_default_resnet34_apm(tiny_backbone, batch):
    """The default APM is a MONAI ResNet34 (3, 4, 6, 3 basic blocks) on the FeatureMap's 256 channels."""
    from monai.networks.nets.resnet import ResNetBlock

    method = build_method("promise", tiny_backbone, {"mode": "apm"})
    resnet = method.apm.resnet
    assert [len(getattr(resnet, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    assert isinstance(resnet.layer1[0], ResNetBlock)
    assert resnet.conv1.in_channels == 256 and resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert resnet.fc is None and method.apm.head.linear.in_features == 512
    assert method.apm.head.linear.out_features == 32
    assert method.apm.feature_map[0].in_channels == sum(tiny_backbone.intermediate_widths)
    assert method(batch)["points"].shape == (2, 16, 2)
    assert method.apm_labels.tolist() == [1] * 8 + [0] * 8


def test_feature_grid_pools_the_apm_input(tiny_backbone, batch):
    """The CPU cap ``feature_grid`` average-pools the concatenated 16 x 16 maps to 8 x 8 before the FeatureMap."""
    seen = []
    method = make(tiny_backbone, feature_grid=8)
    method.apm.feature_map.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    method(batch)
    assert seen == [torch.Size([2, 192, 8, 8])]
    full = make(tiny_backbone)
    full.apm.feature_map.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    full(batch)
    assert seen[-1] == torch.Size([2, 192, 16, 16])


def test_ips_changes_output(tiny_backbone, batch):
    method = make(tiny_backbone)
    feats = method.features(batch)
    offsets = method.ips(feats.embedding)
    assert offsets.shape == (2, tiny_backbone.mask_decoder.num_mask_tokens, 256)
    assert offsets.abs().sum() > 0
    with_ips = method(batch)["logits"]
    ips = method.ips
    method.ips = None
    without = method(batch)["logits"]
    method.ips = ips
    assert not torch.allclose(with_ips, without, atol=1e-4)
    # Zero-init IPS starts exactly at the frozen SAM tokens.
    zero = make(tiny_backbone, ips_zero_init=True)
    base = make(tiny_backbone, mode="apm")
    assert torch.allclose(zero(batch)["logits"], base(batch)["logits"], atol=1e-5)


@pytest.mark.parametrize("apm", ["resnet", "cross"])
def test_apm_gradient_through_frozen_sam_is_exact(tiny_backbone, batch, apm):
    """The gradient that reaches APM through the frozen prompt encoder and decoder is the true one: a small step
    along it lowers the loss by |g| * eps to first order (eval mode: BatchNorm uses its running statistics)."""
    method = make(tiny_backbone, apm=apm, mode="apm").eval()
    params = [p for _, p in method.trainable_parameters()]
    loss0 = method.loss(method(batch), batch)["loss"]
    loss0.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    assert norm > 1e-4
    eps = 3e-3
    with torch.no_grad():
        for p in params:
            p -= eps * p.grad / norm
        loss1 = method.loss(method(batch), batch)["loss"]
    ratio = float(loss0.detach() - loss1) / float(eps * norm)
    assert 0.6 < ratio < 1.4, ratio


@pytest.mark.parametrize("apm", ["resnet", "cross"])
def test_both_apm_variants_train(tiny_backbone, batch, apm):
    """A few Adam steps of APM+IPS on one batch lower the loss, and the APM points move."""
    method = make(tiny_backbone, apm=apm, mode="apm_ips")
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters()], lr=1e-3)
    losses, points = [], []
    for _ in range(8):
        opt.zero_grad()
        out = method(batch)
        loss = method.loss(out, batch)["loss"]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        points.append(out["points"].detach())
    assert losses[-1] < losses[0] - 0.01, losses
    assert (points[-1] - points[0]).abs().max() > 0.01


def test_point_label_pattern():
    assert parse_point_labels(None, 16) == [1] * 8 + [0] * 8
    assert parse_point_labels(None, 3) == [1, 1, 0]
    assert parse_point_labels("1-0-1-0", 4) == [1, 0, 1, 0]
    assert parse_point_labels([0, 1], 2) == [0, 1]
    with pytest.raises(ConfigError):
        parse_point_labels("1-1-0", 4)
    with pytest.raises(ConfigError):
        parse_point_labels([2, 0], 2)


def test_custom_point_labels(tiny_backbone, batch):
    method = make(tiny_backbone, point_labels="1-0-1-0-1-0-1-0")
    assert method(batch)["point_labels"][0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]


def test_bad_options(tiny_backbone):
    for bad in ({"mode": "x"}, {"apm": "vit"}, {"eval_points": "box"}, {"user_points": "merge"},
                {"output_token": 9}, {"num_points": 0}):
        with pytest.raises(ConfigError):
            make(tiny_backbone, **bad)
    with pytest.raises(ConfigError):
        build_method("promise", tiny_backbone, {"not_an_option": 1})


def test_gt_point_sampling():
    label = torch.zeros(3, 32, 32, dtype=torch.long)
    label[0, 5:10, 20:30] = 1
    label[2] = 1  # all foreground
    g = torch.Generator().manual_seed(0)
    coords, labels = sample_gt_points(label, 16, g)
    assert coords.shape == (3, 16, 2) and labels.shape == (3, 16)
    x, y = coords[..., 0].long(), coords[..., 1].long()
    at = label[torch.arange(3)[:, None], y, x]  # ground truth under each point
    assert torch.equal(at, labels)  # positives on foreground, negatives on background
    assert labels[0].tolist() == [1] * 8 + [0] * 8
    assert labels[1].tolist() == [0] * 16  # empty slice: only negative points
    assert labels[2].tolist() == [1] * 16  # no background: only positive points
    again, _ = sample_gt_points(label, 16, torch.Generator().manual_seed(0))
    assert torch.equal(coords, again)


def test_ips_gt_mode_uses_label_points(tiny_backbone, batch):
    method = make(tiny_backbone, mode="ips_gt").eval()
    method.predict(batch)
    first = method.last_points.clone()
    lab = batch["label"][torch.arange(2)[:, None], first[..., 1].long(), first[..., 0].long()]
    assert torch.equal(lab, method.last_point_labels)
    method.predict(batch)
    assert torch.equal(first, method.last_points)  # reproducible outside training
    no_label = {"image": batch["image"]}
    with pytest.raises(InputError):
        method.predict(no_label)
    user = {"image": batch["image"], "points": torch.tensor([[[5.0, 6.0]], [[7.0, 8.0]]]),
            "point_labels": torch.ones(2, 1, dtype=torch.long)}
    method.predict(user)
    assert method.last_point_source == "user" and torch.equal(method.last_points, user["points"])


def test_eval_points_gt_only_outside_training(tiny_backbone, batch):
    method = make(tiny_backbone, eval_points="gt")
    out = method.train()(batch)
    assert method._source == "apm"
    method.eval().predict(batch)
    assert method.last_point_source == "gt"
    assert torch.equal(method.last_point_labels.sum(1), torch.tensor([4, 4]))
    assert not torch.equal(out["points"], method.last_points)


def test_user_points_replace_and_extend(tiny_backbone, batch):
    pts = torch.tensor([[[10.0, 12.0], [40.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]]])
    lbl = torch.tensor([[1, 0], [1, -1]])
    user = dict(batch, points=pts, point_labels=lbl)
    replace = make(tiny_backbone).eval()
    auto = replace.predict(batch)
    auto_points = replace.last_points.clone()
    assert replace.last_point_source == "apm"
    prompted = replace.predict(user)
    assert replace.last_point_source == "user" and torch.equal(replace.last_points, pts)
    assert not torch.allclose(auto, prompted, atol=1e-4)
    extend = make(tiny_backbone, user_points="extend").eval()
    extended = extend.predict(user)
    assert extend.last_point_source == "apm+user"
    assert extend.last_points.shape == (2, 10, 2)
    assert torch.equal(extend.last_points[:, :8], auto_points) and torch.equal(extend.last_points[:, 8:], pts)
    assert torch.equal(extend.last_point_labels[:, 8:], lbl)
    assert not torch.allclose(extended, auto, atol=1e-4)
    with pytest.raises(InputError):
        extend.predict(dict(batch, points=pts))


def test_loss_on_logits_and_faithful_double_sigmoid(tiny_backbone, batch):
    logits = torch.randn(2, 1, 64, 64) * 3
    target = (batch["label"] > 0).float()[:, None]
    bce, dice = bce_dice_loss(logits, target)
    p = torch.sigmoid(logits)
    manual_bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    inter = (p * target).flatten(1).sum(1)
    manual_dice = 1 - ((2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)).mean()
    assert torch.allclose(bce, manual_bce, atol=1e-5) and torch.allclose(dice, manual_dice, atol=1e-5)
    fixed = make(tiny_backbone)
    faithful = make(tiny_backbone, faithful=True)
    out = {"logits": logits}
    clean = fixed.loss(out, batch)
    double = faithful.loss(out, batch)
    assert torch.allclose(clean["loss"], bce + dice)
    assert torch.allclose(double["loss"], sum(bce_dice_loss(torch.sigmoid(logits), target)))
    assert not torch.allclose(clean["loss"], double["loss"])


def test_binary_opening():
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, 8:20, 8:20] = True  # a 12 x 12 square survives a 5 x 5 opening
    mask[0, 0, 25, 25] = True  # an isolated speck does not
    mask[0, 0, 2:4, 20:30] = True  # a 2-pixel-thin bar does not
    mask[0, 0, 0:7, 0:7] = True  # a square at the border survives (outside counts as foreground for erosion)
    opened = binary_opening(mask, 5)
    expected = torch.zeros_like(mask)
    expected[0, 0, 8:20, 8:20] = True
    expected[0, 0, 0:7, 0:7] = True
    assert torch.equal(opened, expected)
    assert torch.equal(binary_opening(mask, 0), mask)


def test_predict_with_opening(tiny_backbone, batch):
    method = make(tiny_backbone, opening_kernel=5).eval()
    plain = make(tiny_backbone).eval()
    p_open = method.predict(batch)[:, 1]
    p_plain = plain.predict(batch)[:, 1]
    opened = binary_opening(p_plain[:, None] > 0.5, 5)[:, 0]
    assert torch.equal(p_open > 0.5, opened)
    assert torch.allclose(p_open[opened], p_plain[opened])


def test_checkpoint_holds_only_the_modules(tiny_backbone):
    """What a checkpoint holds; that loading it gives the same predictions: tests/methods/test_contract.py."""
    from samadapt.engine.checkpoint import adapter_state

    state = adapter_state(make(tiny_backbone))
    assert state and all(k.startswith(("apm.", "ips.")) for k in state)
    assert any("running_mean" in k for k in state)  # ResNet BatchNorm statistics travel with the checkpoint


def test_one_vs_rest_two_classes(tiny_backbone, batch):
    method = make_method("promise", tiny_backbone, 2, mode="ips_gt")
    two = dict(batch, label=batch["label"] * torch.tensor([1, 2])[:, None, None])
    terms = method.loss(method(two), two)
    assert torch.isfinite(terms["loss"])
    assert method.eval().predict(two).shape == (2, 3, 64, 64)


def test_plot_points(tiny_backbone, batch, tmp_path):
    from samadapt.evaluation.point_plots import plot_method_points

    method = make(tiny_backbone)
    path = plot_method_points(method, batch, tmp_path / "points.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert method.training  # restored


@pytest.mark.integration
def test_integration_litemedsam_loss_falls(litemedsam_backbone, real_brain_batch):
    """A few Adam steps of APM+IPS on real MNI152 slices with the real LiteMedSAM weights: the loss falls and the
    frozen backbone does not move."""
    torch.manual_seed(0)
    backbone = litemedsam_backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    method = build_method("promise", backbone, {"mode": "apm_ips", "feature_channels": 64, "apm_lr_scale": 0.1})
    batch = {"image": real_brain_batch["image"][:2], "label": real_brain_batch["label"][:2]}
    with torch.no_grad():
        x = backbone.preprocess(batch["image"])
        batch["features"] = backbone.encode(x, intermediates=method.intermediates)
    opt = torch.optim.Adam(method.param_groups(1e-3))  # as promise_cpu: APM at 0.1x the lr
    losses = train_steps(method, batch, opt, 6)
    assert losses[-1] < losses[0] - 0.02, losses
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("preset", ["promise_cpu", "promise_paper"])
def test_presets_build(tiny_backbone, batch, preset):
    """The presets' options are valid ProMISe options (built here on the tiny backbone)."""
    from samadapt.config.run_config import load_config

    cfg = load_config(preset)
    assert cfg.method.name == "promise" and cfg.train.optimizer == "adam"
    method = build_method("promise", tiny_backbone, cfg.method.options)
    assert method.config.mode == "apm_ips" and method.config.opening_kernel == 5
    assert method(batch)["points"].shape == (2, 16, 2)
