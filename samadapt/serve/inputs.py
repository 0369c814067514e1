"""What the server accepts as input: safe file names, files inside the served folder, zipped DICOM series.

A name a client sends never becomes a path by itself: :func:`safe_name` keeps only the last component, with a
restricted character set, and :func:`inside` resolves a path in the served folder and refuses anything outside.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..data.cases import IMAGE_2D_ENDINGS, VOLUME_ENDINGS, Case, file_ending
from ..data.readers import load_case
from ..errors import InputError

#: Endings the page can open: 2D pictures, NIfTI/NRRD/MHA volumes and a zipped DICOM series.
ACCEPTED_ENDINGS = tuple(e for e in VOLUME_ENDINGS + IMAGE_2D_ENDINGS if e not in (".nhdr", ".mhd")) + (".zip",)


def safe_name(name: str) -> str:
    """The client's file name reduced to a harmless one: last path component (either separator), characters
    outside ``[A-Za-z0-9._-]`` replaced by ``_``, no leading dots; raises ``InputError`` for unsupported endings."""
    base = PureWindowsPath(PurePosixPath(name or "").name).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:120]
    ending = file_ending(base)
    if not base or ending not in ACCEPTED_ENDINGS or base == ending.lstrip("."):
        raise InputError(name or "(no name)", f"unsupported file type; expected one of {', '.join(ACCEPTED_ENDINGS)}")
    return base


def inside(folder: Path, relative: str) -> Path:
    """``folder / relative`` resolved (links followed); ``InputError`` when it leaves ``folder`` or is no file."""
    root = folder.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or path == root:
        raise InputError(relative, "not a file of the served folder")
    if not path.is_file():
        raise InputError(relative, "no such file in the served folder")
    return path


def list_folder(folder: Path) -> list[str]:
    """Openable files under ``folder`` (relative POSIX paths, sorted; hidden entries skipped)."""
    root = folder.resolve()
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and \
                file_ending(p) in ACCEPTED_ENDINGS and p.resolve().is_relative_to(root):
            out.append(rel.as_posix())
    return out


def unzip_series(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Extract the files of a zipped DICOM series flat into ``dest`` (member paths are never used as paths);
    refuses archives that are not zip files or unpack to more than ``max_bytes``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > max_bytes:
                raise InputError(archive.name, f"unpacks to more than {max_bytes // 2**20} MiB")
            dest.mkdir(parents=True, exist_ok=True)
            for i, m in enumerate(members):
                with zf.open(m) as src, open(dest / f"{i:06d}.dcm", "wb") as out:
                    out.write(src.read())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
        raise InputError(archive.name, f"not a readable zip archive ({exc})") from None
    return dest


def load_input(path: Path, name: str, max_unzipped: int) -> Case:
    """Read an uploaded or served file into a ``Case``; every failure is an ``InputError`` naming ``name``."""
    try:
        if file_ending(path) == ".zip":
            folder = unzip_series(path, path.parent / "dicom", max_unzipped)
            case = load_case(folder, "dicom")
        else:
            case = load_case(path, "file")
    except InputError as exc:
        raise InputError(name, exc.problem.replace(str(path.parent), "")) from None
    except Exception as exc:  # a reader library's own failure on a corrupt file
        text = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(name, f"cannot read this file ({text.replace(str(path.parent), '')})") from None
    if case.image.size == 0:
        raise InputError(name, "the image is empty")
    return case
