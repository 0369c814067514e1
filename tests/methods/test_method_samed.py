"""SAMed baseline: shapes for K classes, what trains, SAM's block order vs H-SAM's stage 1, training on tiny."""

from __future__ import annotations

import copy

import pytest
import torch

from samadapt.config.run_config import TrainConfig
from samadapt.engine.trainer import Trainer
from samadapt.errors import ConfigError
from samadapt.layers.lora import lora_modules
from samadapt.methods import build_method
from samadapt.methods.samed import SAMed
from support import make_method, square_batch
from synthetic import Discs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(k: int, b: int = 2, size: int = 64) -> dict:
    return square_batch([(c, 4 + 6 * c, 12 + 6 * c, 8, 30) for c in range(1, k + 1)], b, size)


@pytest.mark.parametrize("k", [1, 3])
def test_shapes_and_probabilities_for_k_classes(tiny_backbone, k):
    method = make_method("samed", tiny_backbone, k)
    assert isinstance(method, SAMed)  # multi-class natively, no one-vs-rest wrapper
    batch = _batch(k)
    out = method(batch)
    assert out["logits"].shape == (2, k + 1, 64, 64)  # 4 x the 16 x 16 grid (= the tiny input size)
    loss = method.loss(out, batch)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    method.eval()
    with torch.no_grad():
        probs = method.predict(batch)
    assert probs.shape == (2, k + 1, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))


def test_trains_lora_decoder_and_no_mask_embed_only(tiny_backbone):
    method = make_method("samed", tiny_backbone, 2, lora_rank=3)
    names = {n for n, _ in method.trainable_parameters()}
    assert names and all(n.startswith(("image_encoder.", "decoder.", "no_mask_embed")) for n in names)
    encoder_names = {n for n in names if n.startswith("image_encoder.")}
    assert encoder_names and all(".lora_" in n for n in encoder_names)
    assert len(lora_modules(method.image_encoder)) == len(tiny_backbone.image_encoder.blocks)
    assert not any(p.requires_grad for p in method.backbone.parameters())
    assert method.decoder.mask_tokens.num_embeddings == 3
    # the base encoder weights and the shared backbone are not touched by a step
    before = copy.deepcopy(tiny_backbone.state_dict())
    base = {n: p.detach().clone() for n, p in method.image_encoder.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for _, p in method.trainable_parameters()], lr=1e-2)
    batch = _batch(2)
    method.train()
    method.loss(method(batch), batch)["loss"].backward()
    opt.step()
    for n, p in method.image_encoder.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    for k, v in tiny_backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    lora_b = [p for n, p in method.image_encoder.named_parameters() if p.requires_grad]
    assert any(p.abs().sum() > 0 for p in lora_b)  # zero-init B moved: gradients reach the encoder


def test_block_order_sam_is_samed_and_hsam_is_hsam_stage1(tiny_backbone):
    samed = make_method("samed", tiny_backbone, 2).eval()
    stage1 = make_method("samed", tiny_backbone, 2, block_order="hsam").eval()
    assert samed.decoder.order == "sam" and stage1.decoder.order == "hsam"
    stage1.load_state_dict(samed.state_dict())  # same weights: only the block order differs
    batch = _batch(2)
    with torch.no_grad():
        a, b = samed(batch)["logits"], stage1(batch)["logits"]
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ConfigError, match="block_order"):
        build_method("samed", tiny_backbone, {"block_order": "reversed"}, num_classes=2)
    with pytest.raises(ConfigError, match="lora_rank"):
        build_method("samed", tiny_backbone, {"lora_rank": 0}, num_classes=2)


def test_samed_trains_through_the_engine(tmp_path, tiny_backbone):
    method = make_method("samed", tiny_backbone, 2)
    cfg = TrainConfig(epochs=6, batch_size=4, lr=3e-3, seed=3)
    result = Trainer(method, cfg, tmp_path / "samed", {}, torch.device("cpu")).fit(
        Discs(12, num_classes=2), Discs(4, num_classes=2, seed=1))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert result.history[-1]["val_dice"] > 0.2
    assert result.best_checkpoint.is_file()
