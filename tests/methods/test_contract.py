"""The contract every registered method keeps, checked on the tiny backbone for each name in ``METHODS.names()``
(a new method is covered by registering it; ``support.SMALL`` holds smaller settings where a method needs them):

- forward and predict shapes for 1 and 2 classes (natively or one-vs-rest): probabilities B x (K + 1) x S x S in
  [0, 1] summing to 1, finite loss terms;
- the loss falls over a few Adam steps on a fixed batch of discs (methods with ``trainable = False`` skip);
- a checkpoint round trip (``engine.checkpoint``) gives identical predictions;
- ``Predictor`` end to end: the label map has the case's shape, the encoder runs once per batch (for one class: the
  method's ``image_encoder_module``), the probabilities are the method's own;
- the fast fp32 options (``FastOptions(bf16="off")``) stay within ``FP32_TOLERANCE`` of the exact path;
- ONNX export matches PyTorch within ``ONNX_TOLERANCE``, or is refused with a ``ConfigError`` where the method
  declares why (``why_not_exportable``), and then the export itself would fail too.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from samadapt.backbones import build_backbone
from samadapt.data.cases import Case
from samadapt.data.slices import collate
from samadapt.engine.checkpoint import adapter_state, load_checkpoint, save_checkpoint
from samadapt.engine.export import ONNX_TOLERANCE, export_onnx
from samadapt.engine.fast import EXACT, FP32_TOLERANCE, FastOptions
from samadapt.errors import ConfigError
from samadapt.methods import METHODS
from support import discs_batch, train_steps, image_items, make_method, onnx_difference, perturb_lora, predictor_probabilities

NAMES = METHODS.names()
CASES = [pytest.param(name, k, id=f"{name}-{k}class") for name in NAMES for k in (1, 2)]
STEPS = 5  # Adam steps of the loss-falls check (lr LR, batch of 2 discs)
LR = 1e-3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def built(name: str, k: int = 1, seed: int = 0):
    """Method ``name`` for ``k`` classes on a fresh tiny backbone (the fast options and LoRA merging change a model
    in place); skips where the method, with its settings, refuses ``k`` classes (box-prompt's ``whole`` mode)."""
    try:
        return make_method(name, build_backbone("tiny"), k, seed)
    except ConfigError as exc:
        if k == 1:
            raise
        pytest.skip(f"{name} refuses {k} classes: {exc}")


def needs_training(name: str) -> None:
    if not METHODS.get(name).trainable:
        pytest.skip(f"{name} has nothing to train (trainable=False)")


@pytest.mark.parametrize("name, k", CASES)
def test_forward_loss_and_predict_shapes(name, k):
    method = built(name, k).train()
    native = METHODS.get(name).max_classes is None or k <= METHODS.get(name).max_classes
    assert (type(method).__name__ == "OneVsRest") is not native  # one head per class beyond what it handles
    batch = discs_batch(2, k)
    out = method(batch)
    logits = {key: v for key, v in out.items() if key.split("/")[-1] == "logits"}  # one per head (one-vs-rest)
    assert logits, f"{name}: forward returned no logits ({sorted(out)})"
    for key, v in logits.items():
        assert v.ndim == 4 and v.shape[0] == 2 and v.shape[1] in (1, k + 1), (key, v.shape)
        assert torch.isfinite(v).all() and v.requires_grad == method.trainable, key  # differentiable
    if method.trainable:
        terms = method.loss(out, batch)
        assert terms["loss"].ndim == 0
        assert all(torch.isfinite(t).all() for t in terms.values()), terms
    method.eval()
    with torch.no_grad():
        probs = method.predict({"image": batch["image"]})
    assert probs.shape == (2, k + 1, 64, 64)
    assert probs.min() >= 0 and probs.max() <= 1
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_a_fixed_batch(name):
    """Adam on ``param_groups`` lowers the loss of one fixed batch; the random draws (noise, sampled points, chain
    choices) repeat each step, so the change comes from the weights."""
    needs_training(name)
    method = built(name).train()
    batch = discs_batch(2)
    if method.uses_backbone and not method.needs_encoder_grad:
        batch["features"] = method.features(batch)  # as the embedding cache hands them over
    optimizer = torch.optim.Adam(method.param_groups(LR))
    losses = train_steps(method, batch, optimizer, STEPS, seed=1)
    assert losses[-1] < 0.99 * losses[0] and losses[-1] == min(losses), losses


@pytest.mark.parametrize("name, k", CASES)
def test_checkpoint_round_trip(name, k, tmp_path):
    """Trained-looking weights and BatchNorm statistics saved, loaded into a differently initialised copy: the same
    tensors and the same predictions, bit for bit."""
    needs_training(name)
    method = built(name, k).train()
    batch = discs_batch(2, k)
    with torch.no_grad():
        method(batch)  # moves BatchNorm running statistics, which travel with the checkpoint
        for _, p in method.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(method, tmp_path / "best", {"method": {"name": name}})
    fresh = built(name, k, seed=1).eval()
    saved, before = adapter_state(method), adapter_state(fresh)
    assert saved.keys() == before.keys() and any(not torch.equal(saved[key], before[key]) for key in saved)
    load_checkpoint(fresh, path)
    loaded = adapter_state(fresh)
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    image = {"image": batch["image"]}
    with torch.no_grad():
        assert torch.equal(fresh.predict(image), method.eval().predict(image))


@pytest.mark.parametrize("name, k", CASES)
def test_predictor_end_to_end(name, k):
    """A 3-slice volume of another size: a label map of its shape with classes 0..K, one encoder pass per batch of
    slices (M-SAM iterations, DeSAM grid points and one-vs-rest heads reuse it), the method's own probabilities."""
    method = built(name, k)
    runs: dict[int, list[int]] = {}  # encoder -> the batch sizes it encoded
    encoders = [m for m in method.modules() if type(m).__name__ == "ImageEncoderViT"]
    assert encoders or not method.uses_backbone
    for encoder in encoders:
        encoder.register_forward_hook(lambda m, inp, _o: runs.setdefault(id(m), []).append(inp[0].shape[0]))
    probs, predictor = predictor_probabilities(method, None, image_items(5, seed=3))
    if not method.uses_backbone:
        assert not runs and method.image_encoder_module is None
    elif k == 1:  # one encoder pass per batch of slices, whichever encoder copy the method uses: the one it names
        assert list(runs.values()) == [[2, 2, 1]] and list(runs) == [id(method.image_encoder_module)]
    else:  # one-vs-rest: every encoder that runs (the shared one, each head's LoRA copy) runs once per batch
        assert runs and all(sizes == [2, 2, 1] for sizes in runs.values()), runs
    volume = np.random.default_rng(0).random((1, 3, 40, 50), dtype=np.float32)
    labels = predictor.predict_case(Case("v", volume))
    assert labels.shape == (3, 40, 50) and set(np.unique(labels)) <= set(range(k + 1))
    items = image_items(5, seed=3)
    with torch.no_grad():
        direct = torch.cat([method.predict(collate(items[i:i + 2])) for i in range(0, 5, 2)])
    torch.testing.assert_close(probs, direct)


@pytest.mark.parametrize("name", NAMES)
def test_fast_fp32_options_match_exact_path(name):
    method = built(name).eval()
    perturb_lora(method)  # trained-looking LoRA updates, so merging them changes weights
    fast_method = copy.deepcopy(method)
    items = image_items(3, seed=3)
    exact, _ = predictor_probabilities(method, EXACT, items)
    fast, predictor = predictor_probabilities(fast_method, FastOptions(bf16="off"), items)
    assert predictor.amp == "none"
    assert exact.shape == fast.shape == (3, 2, 64, 64)
    assert (exact - fast).abs().max().item() <= FP32_TOLERANCE
    assert predictor.fast_report["channels_last_convs"] > 0  # every method here has at least one Conv2d
    has_lora = any("lora_B" in key for key, _ in method.named_parameters())
    assert (predictor.fast_report["merged_lora"] > 0) == has_lora
    assert not any("lora_B" in key for key, _ in fast_method.named_parameters())


@pytest.mark.parametrize("name, k", CASES)
def test_onnx_export_or_declared_refusal(name, k, tmp_path, monkeypatch):
    """Exportable methods: ONNX Runtime agrees with PyTorch (export at batch 1, checked at 3 and 1; K > 1 takes the
    softmax or one-vs-rest path). Refused ones: refused up front naming the method and, at one class, the export
    itself fails when the declared refusal is lifted; nothing half-written either way."""
    method = built(name, k).eval()
    perturb_lora(method)  # non-zero LoRA updates: the export merges them into the weights
    if method.why_not_exportable() is None:
        assert onnx_difference(method, tmp_path / f"{name}.onnx", image_items(4, seed=5)) <= ONNX_TOLERANCE
        return
    with pytest.raises(ConfigError, match=f"method '{name}' cannot be exported to ONNX"):
        export_onnx(method, tmp_path / "m.onnx")
    if k == 1:
        monkeypatch.setattr(method, "why_not_exportable", lambda: None)
        with pytest.raises(ConfigError, match=f"method '{name}'"):
            export_onnx(method, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
