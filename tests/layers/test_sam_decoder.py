"""samadapt.layers.sam_decoder.upscale: SAM's output upscaling on cheaper kernels, same values and gradients."""

import pytest
import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from samadapt.layers.sam_decoder import upscale


def _stock(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
                         nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())


@pytest.mark.parametrize("shape", [(2, 32, 5, 7), (1, 64, 8, 8)])
def test_upscale_equals_the_stock_modules_with_their_gradients(shape):
    torch.manual_seed(0)
    seq = _stock(shape[1])
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        seq[1].weight.uniform_(0.5, 1.5)
        seq[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(shape, requires_grad=True)
    target = torch.randn(shape[0], shape[1] // 8, shape[2] * 4, shape[3] * 4)
    grads = []
    for run in (lambda t: seq(t), lambda t: upscale(seq, t)):
        seq.zero_grad()
        x.grad = None
        y = run(x)
        ((y - target) ** 2).mean().backward()
        grads.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in seq.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = grads
    assert y1.shape == y0.shape
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-6)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_other_modules_run_as_they_are():
    """A transposed convolution that is not 2x2 stride 2 (or any other module) is not rewritten."""
    seq = nn.Sequential(nn.ConvTranspose2d(8, 4, 3, 2, padding=1), nn.ReLU())
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(upscale(seq, x), seq(x))


def test_upscale_exports_with_a_dynamic_batch(tmp_path):
    """Traced at batch 1 (as the ONNX export does), the graph runs at batch 3 with the same values."""
    onnxruntime = pytest.importorskip("onnxruntime")
    seq = _stock(32).eval()

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return upscale(self.seq, x)

    path = tmp_path / "up.onnx"
    torch.onnx.export(Up(), (torch.randn(1, 32, 4, 4),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    x = torch.randn(3, 32, 4, 4)
    (y,) = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), seq(x).detach(), rtol=1e-4, atol=1e-5)
