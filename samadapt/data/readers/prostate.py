"""The multi-site prostate MRI layout (SAML/MaxStyle's six sites, used by DeSAM), read as is (no conversion)::

    ROOT/RUNMC/Case00.nii.gz                 one T2 volume of site A
    ROOT/RUNMC/Case00_segmentation.nii.gz    its prostate mask (``_Segmentation`` also accepted)
    ROOT/BMC/...  ROOT/HCRUDB/...  ROOT/UCL/...  ROOT/BIDMC/...  ROOT/HK/...

Sites (DeSAM / MaxStyle letters, :data:`SITES`): A RUNMC, B BMC, C HCRUDB (I2CVB), D UCL, E BIDMC, F HK; a site
folder may be named by its name, its alternative name or its letter (case-insensitive). No layout is fixed by the
DeSAM release itself (its script reads an nnU-Net-style folder plus a patient-to-centre csv); this is the
distributed per-site layout, and the MaxStyle/SAML convention of ``CaseNN`` + ``CaseNN_segmentation``.

Two readers:

- ``prostate-site``: one site folder; case ids ``Case00`` ...; the source of a single-source run (a 90/10 patient
  split: ``val_fraction 0.1, test_fraction 0``).
- ``prostate-sites``: the root, all sites pooled; case ids ``<letter>/<case>`` (e.g. ``A/Case00``).
  :func:`prostate_sites` maps letters to site folders (the DG protocol's targets).

Labels: the prostate as class 1; mask files must hold only 0 and 1 (or 0 and 255, read as 1). Modality MR.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from .. import _io
from ..cases import VOLUME_ENDINGS, Case, file_ending, strip_ending
from . import READERS
from .base import DatasetSource, _preview

SITES: dict[str, tuple[str, ...]] = {"A": ("RUNMC",), "B": ("BMC",), "C": ("HCRUDB", "I2CVB"), "D": ("UCL",),
                                     "E": ("BIDMC",), "F": ("HK",)}
"""Site letter -> folder names (DeSAM/MaxStyle order)."""

_MASK = re.compile(r"^(?P<case>.+)_segmentation$", re.IGNORECASE)


def site_letter(name: str) -> str | None:
    """The site letter of a folder name (``RUNMC``, ``a``, ``I2CVB`` ...), or None."""
    key = name.strip().upper()
    for letter, names in SITES.items():
        if key == letter or key in names:
            return letter
    return None


def _site_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Case id -> (image, mask) of one site folder; a case without its mask (or a mask without image) fails."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or file_ending(p) not in VOLUME_ENDINGS:
            continue
        stem = Path(strip_ending(p)).name
        match = _MASK.match(stem)
        (masks if match else images)[match.group("case") if match else stem] = p
    for cid, mask in masks.items():
        if cid not in images:
            raise InputError(mask, f"mask without its image {cid}.nii.gz")
    for cid, image in images.items():
        if cid not in masks:
            raise InputError(image, f"no mask {cid}_segmentation.nii.gz beside this image")
    return {cid: (images[cid], masks[cid]) for cid in sorted(images)}


def is_prostate_site(path: Path) -> bool:
    """A folder whose name is a site and which holds ``*_segmentation`` volumes."""
    return path.is_dir() and site_letter(path.name) is not None and any(
        _MASK.match(Path(strip_ending(p)).name) for p in path.iterdir() if file_ending(p) in VOLUME_ENDINGS)


def prostate_sites(root: str | Path) -> dict[str, Path]:
    """Site letter -> site folder under ``root`` (the sites present, A to F); InputError when none or a duplicate."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    found: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        letter = site_letter(p.name) if p.is_dir() else None
        if letter is None:
            continue
        if letter in found:
            raise InputError(p, f"site {letter} twice: {found[letter].name} and {p.name}")
        found[letter] = p
    if not found:
        raise InputError(root, "no prostate site folder (RUNMC, BMC, HCRUDB, UCL, BIDMC, HK or A-F)")
    return dict(sorted(found.items()))


def is_prostate_root(path: Path) -> bool:
    try:
        return any(is_prostate_site(p) for p in prostate_sites(path).values())
    except InputError:
        return False


def _load(case_id: str, image_path: Path, mask_path: Path, nonfinite: str) -> Case:
    image = _io.read_volume(image_path)
    mask = _io.read_volume(mask_path)
    problem = _io.same_geometry(image, mask)
    if problem:
        raise InputError(mask_path, f"mask {problem}")
    values = set(np.unique(mask.array).tolist())
    if not values <= {0, 1} and not values <= {0, 255}:
        raise InputError(mask_path, f"mask values {sorted(values)[:10]}; expected 0/1 (or 0/255) prostate masks")
    label = (mask.array[0] > 0).astype(np.uint8)
    return Case(id=case_id, image=image.array.astype(np.float32), label=label, spacing=image.spacing,
                origin=image.origin, direction=image.direction, source=str(image_path), modality="MR",
                is_2d=False, file_ending=file_ending(image_path), nonfinite=nonfinite,
                meta={"label_source": str(mask_path), "dtype": str(image.array.dtype),
                      "geometry_source": str(image_path)})


@READERS.register
class ProstateSiteSource(DatasetSource):
    """One site folder of the multi-site prostate layout (case ids ``Case00`` ...)."""

    format = "prostate-site"

    def __init__(self, root: str | Path, modality: str | None = None):
        super().__init__(root, modality or "MR")
        if not self.root.is_dir():
            raise InputError(self.root, "not a folder")
        self.site = site_letter(self.root.name)
        self.files = _site_files(self.root)
        if not self.files:
            raise InputError(self.root, "no CaseNN.nii.gz + CaseNN_segmentation.nii.gz pairs in this folder")
        self.case_ids = list(self.files)
        self.labels = {"background": 0, "prostate": 1}

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        image, mask = self.files[case_id]
        return {"image": [image], "label": mask}

    def load(self, case_id: str) -> Case:
        self._check_id(case_id)
        return _load(case_id, *self.files[case_id], self.nonfinite)


@READERS.register
class ProstateSitesSource(DatasetSource):
    """The root of the multi-site layout (all sites pooled): case ids ``<letter>/<case>``; ``sites`` letter -> site."""

    format = "prostate-sites"

    def __init__(self, root: str | Path, modality: str | None = None):
        super().__init__(root, modality or "MR")
        self.sites = {letter: ProstateSiteSource(folder) for letter, folder in prostate_sites(self.root).items()}
        self.case_ids = [f"{letter}/{cid}" for letter, site in self.sites.items() for cid in site.case_ids]
        self.labels = {"background": 0, "prostate": 1}
        missing = sorted(set(SITES) - set(self.sites))
        if missing:
            self.warnings.append(f"sites {', '.join(missing)} not found under {self.root}")

    def _split_id(self, case_id: str) -> tuple[ProstateSiteSource, str]:
        letter, _, cid = case_id.partition("/")
        if letter not in self.sites or cid not in self.sites[letter].files:
            raise InputError(self.root, f"no case {case_id!r} (cases: {_preview(self.case_ids)})")
        return self.sites[letter], cid

    def case_files(self, case_id: str) -> dict[str, Any]:
        site, cid = self._split_id(case_id)
        return site.case_files(cid)

    def load(self, case_id: str) -> Case:
        site, cid = self._split_id(case_id)
        return _load(case_id, *site.files[cid], self.nonfinite)
