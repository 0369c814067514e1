"""Split rules: by case, seeded, k-fold, explicit split files (overriding), few-shot slice subsets."""

from __future__ import annotations

import json

import pytest

from samadapt.data.splits import Split, fewshot_slices, make_split
from samadapt.errors import ConfigError, InputError

IDS = [f"case{i:02d}" for i in range(20)]


def test_random_split_sizes_disjoint_and_seeded():
    s = make_split(IDS, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (14, 2, 4)
    assert sorted(s.train + s.val + s.test) == IDS
    assert make_split(list(reversed(IDS)), seed=3) == s  # independent of input order
    assert make_split(IDS, seed=4) != s
    assert s.to_dict()["source"] == "random" and Split.from_dict(s.to_dict()) == s


def test_small_datasets_still_get_val_and_keep_training():
    s = make_split(IDS[:3], val_fraction=0.1, test_fraction=0.2)
    assert len(s.val) == 1 and len(s.test) == 1 and len(s.train) == 1
    one = make_split(IDS[:1])
    assert one.train == IDS[:1] and one.val == [] and one.test == []


def test_kfold_covers_every_case_once_as_validation():
    folds = [make_split(IDS, test_fraction=0.2, folds=4, fold=f, seed=1) for f in range(4)]
    tests = {tuple(f.test) for f in folds}
    assert len(tests) == 1  # the same held-out test set in every fold
    vals = [c for f in folds for c in f.val]
    assert sorted(vals) == sorted(set(IDS) - set(folds[0].test))
    for f in folds:
        assert not set(f.train) & set(f.val) and f.source == "kfold"
    with pytest.raises(ConfigError):
        make_split(IDS, folds=4, fold=4)


def test_split_file_overrides(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": IDS[:5], "val": IDS[5:6], "test": IDS[6:8]}))
    s = make_split(IDS, split_file=path, seed=9, val_fraction=0.5)
    assert s.train == IDS[:5] and s.val == IDS[5:6] and s.test == IDS[6:8] and s.source == f"file:{path}"
    nnunet = tmp_path / "splits_final.json"
    nnunet.write_text(json.dumps([{"train": IDS[:2], "val": IDS[2:3]}, {"train": IDS[1:3], "val": IDS[:1]}]))
    assert make_split(IDS, split_file=nnunet, fold=1).val == IDS[:1]


@pytest.mark.parametrize("content,problem", [
    ({"train": ["nope"]}, "unknown case ids"),
    ({"train": IDS[:2], "val": IDS[1:2]}, "listed twice"),
    ({"train": [], "val": IDS[:1]}, "training list is empty"),
    ({"train": IDS[:1], "extra": []}, "unknown keys"),
])
def test_bad_split_files(tmp_path, content, problem):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError) as err:
        make_split(IDS, split_file=path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_split_rejects_a_case_in_two_parts():
    with pytest.raises(ConfigError):
        Split(["a"], ["a"], [])


def test_fewshot_fraction_and_count():
    keys = [(c, s) for c in IDS[:5] for s in range(20)]
    ten = fewshot_slices(keys, 0.1, seed=0)
    assert len(ten) == 10 and set(ten) <= set(keys)
    assert ten == sorted(ten, key=keys.index)  # original order kept
    assert fewshot_slices(keys, 0.1, seed=0) == ten and fewshot_slices(keys, 0.1, seed=1) != ten
    assert len(fewshot_slices(keys, 7)) == 7 and len(fewshot_slices(keys, 1000)) == 100
    assert len(fewshot_slices(keys, 0.001)) == 1
    for bad in (0, 0.0, 1.5, -3):
        with pytest.raises(ConfigError):
            fewshot_slices(keys, bad)
