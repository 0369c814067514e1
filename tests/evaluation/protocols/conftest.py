"""Fixtures of the protocol tests: a folder of 64 px disc pictures and tiny-backbone runs trained on it (1 epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import SMALL
from synthetic import write_disc_pictures


@pytest.fixture(scope="session")
def disc_pictures(tmp_path_factory) -> Path:
    """Eight 64 x 64 pictures (the tiny backbone's input size: no resampling) with one bright disc each; the
    default split gives 2 test cases."""
    return write_disc_pictures(tmp_path_factory.mktemp("protocol_discs"), 8, (64, 64), seed=3, name="d{:02d}",
                               centre=(18, 46, 18, 46), radius=(8, 14))


@pytest.fixture(scope="session")
def train_tiny(disc_pictures, tmp_path_factory):
    """``train_tiny(method, **options)`` -> the run folder of ``method`` trained for one epoch on the discs."""
    from samadapt.config.run_config import load_config
    from samadapt.engine.run import train

    def run(method: str, **options) -> Path:
        out = tmp_path_factory.mktemp(f"run_{method}")
        sets = [f"method.options.{k}={json.dumps(v)}" for k, v in {**SMALL.get(method, {}), **options}.items()]
        train(load_config(None, ["backbone.name=tiny", f"method.name={method}", *sets, f"data.path={disc_pictures}",
                                 "data.cache=off", "data.empty_ratio=null", "train.epochs=1", "train.batch_size=4",
                                 "train.device=cpu", f"output={out}"]))
        return out

    return run
