"""Open a dataset from one spec string, the form the CLI and configs carry.

``"synthderm"`` is the embedded synthetic default; ``"isic2019:/path"`` and ``"folder:/path"``
read real data from disk.
"""

from __future__ import annotations

from medaudit.models.data.folder import FolderDataset
from medaudit.models.data.isic import ISIC2019
from medaudit.models.data.synthetic import SynthDerm
from medaudit.models.errors import DatasetError

SCHEMES = ("synthderm", "isic2019:<path>", "folder:<path>")


def open_dataset(spec: str) -> SynthDerm | ISIC2019 | FolderDataset:
    """The dataset a spec names.

    Args:
        spec: ``"synthderm"``, ``"isic2019:<path>"`` or ``"folder:<path>"``.

    Raises:
        DatasetError: An unknown scheme, a path missing or given where none is taken, or any
            error of the dataset itself.
    """
    scheme, sep, path = spec.partition(":")
    if scheme == "synthderm":
        if sep:
            raise DatasetError(f"dataset spec {spec!r}: synthderm takes no path; valid: {', '.join(SCHEMES)}")
        return SynthDerm()
    if scheme not in ("isic2019", "folder"):
        raise DatasetError(f"unknown dataset spec {spec!r}; valid: {', '.join(SCHEMES)}")
    if not path:
        raise DatasetError(f"dataset spec {spec!r} has no path; write {scheme}:<path>")
    return ISIC2019(path) if scheme == "isic2019" else FolderDataset(path)
