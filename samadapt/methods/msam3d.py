"""3D M-SAM as released (METHODS.md 4.1-4.3) on the ``sam_med3d`` backbone: a model, its training step and
whole-volume prediction. Not a registered method (the method contract and ``samadapt train`` run on 2D slices; the
2D port is ``samadapt.methods.msam``): ``samadapt.engine.volume_run`` trains and predicts it on whole volumes, behind
``samadapt train3d`` / ``samadapt predict3d``.

Shapes for the official backbone (cube side S = 128, grid g = 8, C = 384; low-res logits 4g = 32 per side):

- image encoder: a copy of SAM-Med3D's 3D ViT, frozen, LoRA (``lora_rank`` 4) on q and v of every block's ``qkv``;
  embedding B x C x g^3;
- prompt encoder / mask decoder: trainable copies (``param_groups``: ``sam_lr_scale`` 0.1 x lr);
- 3D MEA (``samadapt.layers.mask_enhanced_adapter`` with a 3-long grid: 3x3x3 convs, rel_pos_d/h/w, 6 heads at C 384,
  full attention over g^3 tokens): ``src = MEA(E, mask_downscaling(prev))`` replaces ``E + dense``.

One iteration: prompt = the newest voxel click (all clicks so far with ``multi_click``), mask prompt = the previous
low-res logits B x 1 x (4g)^3 (zeros at first), logits = decoder(MEA(E, P), sparse)[:, :1]. Training
(``training_loss``): ``iterations`` (11 as released) iterations, each with a click drawn from the error of the previous
prediction (trilinear to S^3, probability > 0.5) against the label (``samadapt.data.clicks.batch_voxel_clicks``),
nothing detached, loss = sum over iterations of DiceCE (sigmoid, squared denominators) at S^3. Prediction
(``predict_patch``): ``clicks`` > 0 simulated clicks from a given label, else ``infer_iterations`` click-free
iterations; ``patch_predictor`` turns it into the ``samadapt.data.volume3d.sliding_window`` callable.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn

from ..backbones.sam_med3d import SamMed3D
from ..data.clicks import batch_voxel_clicks
from ..errors import ConfigError
from ..layers.lora import lora_parameters
from ..layers.lora_heads import apply_qv_lora
from ..layers.mask_enhanced_adapter import MaskEnhancedAdapter


class MSAM3D(nn.Module):
    """3D M-SAM on a ``SamMed3D`` backbone (which stays frozen and unchanged)."""

    def __init__(self, backbone: SamMed3D, lora_rank: int = 4, mea_heads: int = 6, mea_tokens: str = "full",
                 sam_lr_scale: float = 0.1, click_mode: str = "random", eval_click_mode: str = "center",
                 multi_click: bool = False, infer_iterations: int = 3):
        super().__init__()
        if not isinstance(backbone, SamMed3D):
            raise ConfigError(f"msam3d needs the sam_med3d backbone, got {getattr(backbone, 'name', backbone)!r}")
        self.backbone = backbone.freeze()
        self.image_encoder = copy.deepcopy(backbone.image_encoder)
        self.lora_layers = apply_qv_lora(self.image_encoder, list(backbone.lora_targets), lora_rank, freeze_base=True)
        self.prompt_encoder = copy.deepcopy(backbone.prompt_encoder).requires_grad_(True)
        self.mask_decoder = copy.deepcopy(backbone.mask_decoder).requires_grad_(True)
        self.mea = MaskEnhancedAdapter(backbone.embed_dim, tuple(backbone.embed_grid), mea_heads, tokens=mea_tokens)
        self.size, self.low = backbone.input_size, backbone.low_res_size
        self.sam_lr_scale, self.click_mode, self.eval_click_mode = sam_lr_scale, click_mode, eval_click_mode
        self.multi_click, self.infer_iterations = multi_click, infer_iterations

    def trainable_parameters(self):
        """(name, parameter) of what trains (LoRA, MEA, prompt encoder, mask decoder): what checkpoints store."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def param_groups(self, lr: float) -> list[dict]:
        """LoRA + MEA at ``lr``; the prompt encoder and mask decoder at ``sam_lr_scale * lr`` (AdamW 8e-4 as released)."""
        main = list(self.mea.parameters()) + lora_parameters(self.image_encoder)
        sam = [p for m in (self.prompt_encoder, self.mask_decoder) for p in m.parameters()]
        return [{"params": main, "lr": lr}, {"params": sam, "lr": lr * self.sam_lr_scale}]

    def step(self, embedding: Tensor, prev: Tensor, points: tuple[Tensor, Tensor] | None) -> Tensor:
        """embedding B x C x g^3, prev B x 1 x (4g)^3 logits, points (B x N x 3, B x N) or None -> B x 1 x (4g)^3."""
        sparse, dense = self.prompt_encoder(points=points, masks=prev)
        if sparse.shape[0] != embedding.shape[0]:
            sparse = sparse.expand(embedding.shape[0], -1, -1)
        masks, _ = self.mask_decoder.decode(self.mea(embedding, dense), self.prompt_encoder.get_dense_pe(), sparse)
        return masks[:, :1]

    def refine(self, image: Tensor, iterations: int, label: Tensor | None = None, click_mode: str | None = None
               ) -> list[Tensor]:
        """image B x 1 x S^3 (normalised); ``label`` B x S^3 for simulated clicks (None: click-free iterations).
        Returns each iteration's low-res logits B x 1 x (4g)^3."""
        embedding = self.image_encoder(self.backbone.preprocess(image))
        prev = embedding.new_zeros(image.shape[0], 1, self.low, self.low, self.low)
        clicks: list[tuple[Tensor, Tensor]] = []
        outs = []
        for _ in range(iterations):
            points = None
            if label is not None:
                with torch.no_grad():
                    pred = self.upsample(prev.detach())[:, 0] > 0
                    clicks.append(batch_voxel_clicks(pred, label > 0, click_mode or self.click_mode))
                points = (torch.cat([c for c, _ in clicks], 1), torch.cat([lb for _, lb in clicks], 1)) \
                    if self.multi_click else clicks[-1]
            prev = self.step(embedding, prev, points)
            outs.append(prev)
        return outs

    def upsample(self, logits: Tensor) -> Tensor:
        """B x 1 x (4g)^3 -> B x 1 x S^3, trilinear (as released)."""
        return F.interpolate(logits, size=(self.size,) * 3, mode="trilinear", align_corners=False)

    def training_loss(self, image: Tensor, label: Tensor, iterations: int = 11) -> Tensor:
        """Sum over ``iterations`` click iterations of DiceCE(sigmoid, squared_pred) at S^3; label B x S^3."""
        fn = DiceCELoss(sigmoid=True, squared_pred=True)
        target = (label > 0).float()[:, None]
        outs = self.refine(image, iterations, label)
        return sum(fn(self.upsample(o), target) for o in outs)

    @torch.no_grad()
    def predict_patch(self, image: Tensor, clicks: int = 0, label: Tensor | None = None) -> Tensor:
        """Foreground probabilities B x S^3 after ``clicks`` simulated clicks from ``label`` (``eval_click_mode``),
        or after ``infer_iterations`` click-free iterations when ``clicks`` is 0."""
        if clicks and label is None:
            raise ConfigError("msam3d: simulated clicks need the label")
        outs = self.refine(image, clicks or self.infer_iterations, label if clicks else None, self.eval_click_mode)
        return torch.sigmoid(self.upsample(outs[-1]))[:, 0]

    def patch_predictor(self, clicks: int = 0):
        """``(patch S^3 numpy[, label patch S^3]) -> probabilities S^3 numpy`` for
        ``samadapt.data.volume3d.sliding_window``: click-free, or ``clicks`` simulated clicks from the label patch (a
        window without foreground gets padding points, i.e. no click)."""
        def predict(patch: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
            device = self.mea.norm_i.weight.device
            x = torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None, None].to(device)
            y = None if label is None else torch.from_numpy(np.ascontiguousarray(label > 0))[None].to(device)
            return self.predict_patch(x, clicks, y)[0].cpu().numpy()
        return predict
