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


@pytest.fixture(scope="session")
def mni152_brain_dataset(tmp_path_factory):
    """Path of the MNI152 brain-extraction dataset (nnU-Net raw: slabs mni152_train / _val / _test)."""
    from samadapt.data.demo_data import build_mni152

    return build_mni152(tmp_path_factory.mktemp("mni152") / "brain", task="brain")


@pytest.fixture(scope="session")
def mni152_tissue_dataset(tmp_path_factory):
    """Path of the MNI152 3-class tissue dataset (same slabs as the brain task)."""
    from samadapt.data.demo_data import build_mni152

    return build_mni152(tmp_path_factory.mktemp("mni152") / "tissue", task="tissue")


def _real_batch(dataset_path, n=4, input_size=256):
    from samadapt.data.readers import open_dataset
    from samadapt.data.slices import SliceDataset, collate

    source = open_dataset(dataset_path)
    ds = SliceDataset([source.load("mni152_train")], input_size, axis=0)
    fg = [i for i, key in enumerate(ds.slice_keys) if key in set(ds.foreground_keys())]
    picks = [fg[int(j)] for j in torch.linspace(0, len(fg) - 1, n + 2)[1:-1]]  # spread over the slab
    return collate([ds[i] for i in picks])


@pytest.fixture(scope="session")
def real_brain_batch(mni152_brain_dataset):
    """A collated batch of 4 foreground slices of the MNI152 training slab at 256 px (image, label, key, ...)."""
    return _real_batch(mni152_brain_dataset)


@pytest.fixture(scope="session")
def real_tissue_batch(mni152_tissue_dataset):
    """Like ``real_brain_batch`` for the 3-class tissue task."""
    return _real_batch(mni152_tissue_dataset)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many small ops: on a loaded 2-core machine two threads run them many times
    slower (thread oversubscription). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
