import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_backbone():
    from samadapt.backbones import build_backbone

    return build_backbone("tiny")


@pytest.fixture(scope="session")
def litemedsam_backbone():
    from samadapt.backbones import build_backbone

    return build_backbone("litemedsam").eval()
