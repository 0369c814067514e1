import pytest
import torch

from samadapt.errors import ConfigError
from samadapt.methods import build_method
from samadapt.methods.prompting import label_boxes
from support import square_batch


def _batch(k=1, n=2):
    """Class 1 (and 2 for k > 1) on the first image only; the second is empty."""
    return square_batch([(1, 10, 30, 20, 40, 0)] + ([(2, 40, 50, 40, 60, 0)] if k > 1 else []), n)


def test_label_boxes():
    boxes, present = label_boxes(_batch()["label"])
    assert boxes[0].tolist() == [20.0, 10.0, 39.0, 29.0] and present.tolist() == [True, False]


def test_decoder_trains_only_its_decoder_and_prompts(tiny_backbone):
    m = build_method("decoder", tiny_backbone, {}, 1)
    names = {n.split(".")[0] for n, _ in m.trainable_parameters()}
    assert names == {"mask_decoder", "sparse", "dense"}
    frozen = {n: p.clone() for n, p in m.backbone.named_parameters()}
    opt = torch.optim.AdamW([p for _, p in m.trainable_parameters()], lr=1e-2)
    batch = _batch()
    before = m.loss(m(batch), batch)["loss"]
    before.backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in m.backbone.named_parameters())
    assert m.loss(m(batch), batch)["loss"] < before


@pytest.mark.parametrize("k", [3])  # 1 and 2 classes: tests/methods/test_contract.py
def test_decoder_shapes_for_k_classes(tiny_backbone, k):
    m = build_method("decoder", tiny_backbone, {}, k)
    probs = m.predict(_batch(k))
    assert probs.shape == (2, k + 1, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))


def test_box_prompt_modes(tiny_backbone):
    gt = build_method("box-prompt", tiny_backbone, {"mode": "gt"}, 1)
    probs = gt.predict(_batch())
    assert probs.shape == (2, 2, 64, 64)
    assert probs[1, 1].max() < 1e-6  # no ground truth on slice 1: the oracle predicts nothing
    whole = build_method("box-prompt", tiny_backbone, {"mode": "whole"}, 1)
    assert whole.predict({"image": torch.rand(1, 3, 64, 64)}).shape == (1, 2, 64, 64)
    assert not any(p.requires_grad for p in whole.parameters())
    with pytest.raises(ConfigError, match="mode 'gt'"):
        build_method("box-prompt", tiny_backbone, {"mode": "whole"}, 2)
    with pytest.raises(ConfigError, match="unknown option"):
        build_method("box-prompt", tiny_backbone, {"mdoe": "gt"}, 1)


def test_box_prompt_takes_user_points_and_boxes(tiny_backbone):
    m = build_method("box-prompt", tiny_backbone, {"mode": "whole"}, 1)
    image = torch.rand(1, 3, 64, 64)
    whole = m.predict({"image": image})
    pts = torch.tensor([[[20.0, 30.0]]])
    pos = m.predict({"image": image, "points": pts, "point_labels": torch.ones(1, 1)})
    neg = m.predict({"image": image, "points": pts, "point_labels": torch.zeros(1, 1)})
    box = torch.tensor([[4.0, 4.0, 30.0, 40.0]])
    both = m.predict({"image": image, "points": pts, "point_labels": torch.ones(1, 1), "boxes": box})
    assert m.prompt_kinds == ("points", "boxes")
    for a, b in [(whole, pos), (pos, neg), (pos, both), (both, m.predict({"image": image, "boxes": box}))]:
        assert (a - b).abs().max() > 1e-3


def test_one_vs_rest_wraps_binary_methods(tiny_backbone, monkeypatch):
    from samadapt.methods import METHODS
    from samadapt.methods.decoder import DecoderBaseline

    class BinaryDecoder(DecoderBaseline):
        name = "binary-decoder"
        max_classes = 1

    # registered for this test only: later tests list METHODS.names() (benchmark defaults, method facts)
    monkeypatch.setitem(METHODS._items, BinaryDecoder.name, BinaryDecoder)
    assert METHODS.register(BinaryDecoder) is BinaryDecoder and "binary-decoder" in METHODS.names()
    m = build_method("binary-decoder", tiny_backbone, {}, 2)
    assert type(m).__name__ == "OneVsRest" and len(m.heads) == 2
    batch = _batch(2)
    terms = m.loss(m(batch), batch)
    assert {"loss", "class1_loss", "class2_loss"} <= set(terms)
    probs = m.predict(batch)
    assert probs.shape == (2, 3, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))


def test_unet_needs_no_backbone():
    m = build_method("unet", None, {"input_size": 64}, 2)
    assert m.input_size == 64 and m.predict(_batch(2)).shape == (2, 3, 64, 64)


def test_decoder_starts_from_the_whole_box_baseline(tiny_backbone):
    """With init_from_box, the untrained decoder baseline equals zero-shot box-prompt with the whole-image box."""
    batch = {"image": torch.rand(2, 3, 64, 64)}
    trained = build_method("decoder", tiny_backbone, {"init_from_box": True}, 1)
    zero_shot = build_method("box-prompt", tiny_backbone, {"mode": "whole"}, 1)
    with torch.no_grad():
        torch.testing.assert_close(trained.predict(batch), zero_shot.predict(batch), atol=1e-5, rtol=1e-5)
        random_init = build_method("decoder", tiny_backbone, {"init_from_box": False}, 1)
        assert not torch.allclose(random_init.predict(batch), zero_shot.predict(batch), atol=1e-3)
