"""Intermediate-layer selection: roles and indices resolve per backbone, the hooked maps are those layers' outputs,
the embedding cache keeps selections apart, and a method's request reaches the encoder and the cache."""

from __future__ import annotations

import pytest
import torch

from samadapt.backbones import build_backbone
from samadapt.engine.embedding_cache import EmbeddingCache
from samadapt.config.run_config import DataConfig
from samadapt.engine.run import embedding_cache
from samadapt.errors import ConfigError
from samadapt.methods import build_method

SMALL_PROMISE = {"feature_channels": 8, "resnet_layers": [1, 1, 1, 1], "resnet_widths": [8, 8, 8, 8],
                 "ips_hidden": 16, "num_points": 4}


def block_outputs(backbone, x):
    """Every layer's output (NCHW), taken with hooks written here, independent of ``Backbone.encode``."""
    outs = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, i=i: outs.__setitem__(i, o))
               for i, m in enumerate(backbone.layer_modules())]
    try:
        with torch.no_grad():
            backbone.image_encoder(x)
    finally:
        for h in handles:
            h.remove()
    return [outs[i].permute(0, 3, 1, 2) for i in range(len(outs))]


def test_tiny_roles_and_indices(tiny_backbone):
    b = tiny_backbone
    assert b.resolve_layers(True) == b.resolve_layers("default") == (0, 1, 2)
    assert b.resolve_layers("stage_ends") == (0, 1, 2, 3)
    assert b.resolve_layers("early_stages") == (0, 1, 2) and b.resolve_layers("late_stages") == (1, 2, 3)
    assert b.resolve_layers([3, 1]) == (3, 1) and b.resolve_layers(False) == () == b.resolve_layers(None)
    assert b.widths_of("late_stages") == (64, 64, 64) and b.intermediate_widths == (64, 64, 64)
    with pytest.raises(ConfigError, match="tiny has no intermediate-layer role 'global_attention'.*late_stages"):
        b.resolve_layers("global_attention")
    with pytest.raises(ConfigError, match=r"layers 0\.\.3.*\[4\]"):
        b.resolve_layers([1, 4])


def test_encode_returns_the_requested_layers_in_order(tiny_backbone):
    b = tiny_backbone
    x = b.preprocess(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    ref = block_outputs(b, x)
    with torch.no_grad():
        for request, layers in (("late_stages", (1, 2, 3)), (True, (0, 1, 2)), ([3, 0], (3, 0))):
            got = b.encode(x, intermediates=request).intermediates
            assert len(got) == len(layers)
            for t, i in zip(got, layers):
                torch.testing.assert_close(t, ref[i])
        assert not torch.allclose(ref[0], ref[3])  # the layers differ, so picking the wrong one would show
        assert b.encode(x, intermediates=False).intermediates == []


def test_sam_vit_roles_on_meta_device():
    """SAM ViT: stage ends = the global-attention blocks; ProMISe's 6/9/12 = late_stages; DeSAM's 3/6/9 = default."""
    expected = {"sam_vit_b": ((2, 5, 8, 11), 768, 12), "sam_vit_l": ((5, 11, 17, 23), 1024, 24),
                "sam_vit_h": ((7, 15, 23, 31), 1280, 32)}
    for name, (ends, width, depth) in expected.items():
        with torch.device("meta"):
            b = build_backbone(name, pretrained=False)
        assert b.resolve_layers("global_attention") == b.resolve_layers("stage_ends") == ends
        assert b.resolve_layers("late_stages") == ends[1:]
        assert b.resolve_layers(True) == b.resolve_layers("early_stages") == ends[:3] == b.intermediate_blocks
        assert b.layer_widths == (width,) * depth and len(b.layer_modules()) == depth
        assert b.describe()["layer_roles"]["late_stages"] == list(ends[1:])


@pytest.mark.integration
def test_litemedsam_stage_outputs(litemedsam_backbone):
    """TinyViT stages: 128 x 128 x 128, then 160, 320, 320 on the 64 x 64 grid; late_stages = stages 1-3."""
    b = litemedsam_backbone
    assert b.resolve_layers("late_stages") == b.resolve_layers(True) == (1, 2, 3)
    assert b.resolve_layers("early_stages") == (0, 1, 2)
    with torch.no_grad():
        f = b.encode(b.preprocess(torch.rand(1, 3, 256, 256)), intermediates="stage_ends")
    assert [tuple(t.shape[1:]) for t in f.intermediates] == [(128, 128, 128), (160, 64, 64), (320, 64, 64),
                                                            (320, 64, 64)]
    assert b.widths_of("stage_ends") == (128, 160, 320, 320)


def test_cache_keeps_layer_selections_apart(tmp_path, tiny_backbone):
    b = tiny_backbone
    default = EmbeddingCache(tmp_path, b, intermediates=True)
    assert EmbeddingCache(tmp_path, b, intermediates=(0, 1, 2)).dir == default.dir  # same layers, same entries
    assert "intermediate_layers" not in default.namespace  # the default keeps the namespace it always had
    late = EmbeddingCache(tmp_path, b, intermediates="late_stages")
    assert late.dir != default.dir and late.namespace["intermediate_layers"] == [1, 2, 3]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    keys = ["ab01", "ab02"]
    first = late.get_or_compute(keys, images)
    again = EmbeddingCache(tmp_path, b, intermediates="late_stages").get_or_compute(keys, images)
    ref = block_outputs(b, b.preprocess(images))
    for t, u, i in zip(first.intermediates, again.intermediates, (1, 2, 3)):
        torch.testing.assert_close(t, ref[i].half().float())
        assert torch.equal(t, u)


def test_promise_asks_for_late_stages_and_the_engine_caches_them(tiny_backbone, tmp_path):
    method = build_method("promise", tiny_backbone, SMALL_PROMISE)
    assert method.intermediates == (1, 2, 3)
    x = torch.rand(1, 3, 64, 64)
    feats = method.features({"image": x})
    ref = block_outputs(tiny_backbone, tiny_backbone.preprocess(x))
    for t, i in zip(feats.intermediates, (1, 2, 3)):
        torch.testing.assert_close(t, ref[i])
    cache = embedding_cache(tiny_backbone, method, DataConfig(cache="on", cache_dir=str(tmp_path)))
    assert cache.layers == (1, 2, 3)
    assert build_method("promise", tiny_backbone, {**SMALL_PROMISE, "feature_layers": [0, 3]}).intermediates == (0, 3)
    assert build_method("promise", tiny_backbone, {**SMALL_PROMISE, "mode": "ips_gt"}).intermediates == ()
    two = build_method("promise", tiny_backbone, SMALL_PROMISE, num_classes=2)  # one-vs-rest forwards the request
    assert two.intermediates == (1, 2, 3)
    with pytest.raises(ConfigError, match="no intermediate-layer role 'late'"):
        build_method("promise", tiny_backbone, {**SMALL_PROMISE, "feature_layers": "late"})
