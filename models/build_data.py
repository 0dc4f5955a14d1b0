"""The data side of the offline build, whatever the dataset (architecture.md: the pipeline never
asks which dataset it holds).

:func:`build_data` wraps a dataset for :func:`medaudit.models.pipeline.build`:

* :class:`SynthDermData`: synthderm, rendered by its generator (cached splits, counterfactual
  pairs, exact masks, the three test variants of method.md §5.4). The demo's build; its stage
  keys are the generator config, as before.
* :class:`DatasetData`: any :class:`~medaudit.models.data.protocol.AnnotatedDataset` read from
  disk (ISIC 2019, CheXpert, class folders, folder + labels CSV): images resized square to the
  model's input side (bicubic, as the offline audit reads them), artifact membership from the
  annotations, masks from the dataset (ground truth or derived: :attr:`DatasetData.mask_source`),
  and the real-data evaluation of :mod:`medaudit.models.realeval`.

Both give the pipeline the same things: the training split as uint8 arrays, artifact membership
per training sample, clean validation images for calibration, per-class artifact rates, the
fine-tuning subset's masks, and the :class:`~medaudit.models.evaluate.EvalData` of the test split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medaudit.models.data.geometry import model_view
from medaudit.models.data.protocol import MASK_SOURCES, AnnotatedDataset
from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
from medaudit.models.errors import ConfigError
from medaudit.models.evaluate import EvalData
from medaudit.models.registry import ModelCfg
from medaudit.models.train import Progress, render_split, render_splits


def mask_source(ds: AnnotatedDataset, artifact: str) -> str:
    """Where ``artifact``'s masks come from: ``"ground_truth"``, ``"derived"`` (binarised CAV
    heatmaps, ``medaudit localize --export-masks``) or ``"none"``, as the dataset says
    (``mask_source_of``); ground truth for a dataset that has masks and does not say."""
    of = getattr(ds, "mask_source_of", None)
    src = of(artifact) if callable(of) else ("ground_truth" if ds.has_masks else "none")
    if src not in MASK_SOURCES:
        raise ConfigError(f"dataset mask source {src!r} of {artifact}; valid: {', '.join(MASK_SOURCES)}")
    return str(src)


class SynthDermData:
    """Synthderm through its generator: what the demo build has always used."""

    can_pair = True
    mask_source = "ground_truth"

    def __init__(self, cfg: SynthDermConfig, cache: Path, progress: Progress | None = None) -> None:
        self.cfg, self.cache, self.progress = cfg, cache, progress
        self.ds = SynthDerm(cfg)
        self.name = "synthderm"
        self.label_names: tuple[str, ...] = tuple(self.ds.label_names)
        self.tr_idx = self.ds.indices("train")

    def key(self) -> Any:
        """What the stage keys hold for the data: the generator config."""
        return self.cfg.to_dict()

    @property
    def size(self) -> int:
        return self.cfg.size

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return render_split(self.ds, "train", cache_dir=self.cache, progress=self.progress)

    def val_clean(self, artifact: str) -> torch.Tensor:
        return render_split(self.ds, "val", "clean", artifact, cache_dir=self.cache, progress=self.progress)[
            0
        ]

    def train_membership(self) -> dict[str, np.ndarray]:
        """0/1 per training sample of every artifact drawn in the training split."""
        m = self.ds.membership
        return {a: m[a][self.tr_idx].astype(np.int64) for a in m if m[a][self.tr_idx].any()}

    def rates(self, artifact: str) -> tuple[float, ...]:
        """The spec's artifact rate per class (what the draw realises, up to rounding)."""
        return tuple(float(r) for r in self.cfg.spec.get(artifact, (0.0,) * len(self.label_names)))

    def pairs(self, artifact: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split rendered without and with ``artifact`` (counterfactual pairs)."""
        p = render_splits(self.ds, "train", ("clean", "attacked"), artifact, self.cache, self.progress)
        return p["clean"][0], p["attacked"][0]

    def train_masks(self, pos: np.ndarray, artifact: str) -> np.ndarray:
        """Masks (len(pos), H, W) float32 of ``artifact`` on training positions ``pos``; zero where
        a sample does not carry it (method.md §4.6)."""
        size = self.cfg.size
        masks = np.zeros((len(pos), size, size), np.float32)
        member = self.ds.membership[artifact]
        for j, p in enumerate(pos):
            i = int(self.tr_idx[p])
            if member[i]:
                masks[j] = self.ds.sample(i, "ch", artifact).masks[artifact]
        return masks

    def eval_data(
        self,
        mcfg: ModelCfg,
        *,
        artifact: str,
        cav: np.ndarray,
        layer: str,
        max_artifact_samples: int,
        tcav_class: int,
        seed: int,
    ) -> EvalData:
        from medaudit.models.evaluate import synthderm_eval_data

        return synthderm_eval_data(
            self.ds,
            mcfg,
            artifact=artifact,
            cav=cav,
            cav_layer=layer,
            cav_kind="signal",
            max_artifact_samples=max_artifact_samples,
            tcav_class=tcav_class,
            cache_dir=self.cache,
        )


class DatasetData:
    """Any annotated dataset on disk, at the model's input side (see the module docstring).

    Args:
        ds: The dataset.
        spec: Its spec string (``folder:/path``, ``isic2019:/path``, …), recorded in cards and banks
            so that ``refine-cav`` can open it again.
        size: The model's input side.
        cache: Folder for the split arrays (keyed by :meth:`key`); None: read every time.
        artifact: The build's artifact, whose masks (:attr:`mask_source`) RRR and the evaluation use.
        progress: Progress bars.
    """

    can_pair = False

    def __init__(
        self,
        ds: AnnotatedDataset,
        spec: str,
        size: int,
        cache: Path | None,
        artifact: str,
        progress: Progress | None = None,
    ) -> None:
        self.ds, self.name, self.size, self.cache, self.progress = ds, spec, size, cache, progress
        self.label_names = tuple(ds.label_names)
        self.labels = np.asarray(ds.labels, dtype=np.int64)
        self.mask_source = mask_source(ds, artifact) if artifact else "none"
        self.tr_idx = np.asarray(ds.indices("train"), dtype=np.int64)
        n = len(self.labels)
        self.membership: dict[str, np.ndarray] = {}
        for art, ids in ds.artifact_ids("all").items():
            m = np.zeros(n, dtype=bool)
            m[np.asarray(ids, dtype=np.int64)] = True
            self.membership[art] = m
        if len(self.tr_idx) == 0:
            raise ConfigError(f"dataset {spec} has no training images")
        self._key: dict[str, Any] | None = None
        #: how images become ``size``² (a model spec's resize/crop policy; stage keys carry it)
        self.fit = "resize"

    def key(self) -> Any:
        """The dataset's identity for stage keys: its spec, labels, splits, annotations, mask
        source, and the name, size and mtime of every image and mask file it can list, so that
        re-annotated data or re-derived masks rebuild what depends on them."""
        if self._key is None:
            h = hashlib.sha256()
            h.update(self.labels.tobytes())
            for split in ("train", "val", "test"):
                h.update(split.encode() + np.asarray(self.ds.indices(split), np.int64).tobytes())
            h.update(json.dumps({a: np.flatnonzero(m).tolist() for a, m in self.membership.items()}).encode())
            for p in _files(self.ds):
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
            self._key = {
                "dataset": self.name,
                "labels": list(self.label_names),
                "size": self.size,
                **({"fit": self.fit} if self.fit != "resize" else {}),
                "mask_source": self.mask_source,
                "content": h.hexdigest()[:16],
            }
        return self._key

    def arrays(self, idx: np.ndarray, what: str) -> torch.Tensor:
        """Images ``idx`` as uint8 (N, 3, size, size), cached under ``what`` and :meth:`key`."""
        digest = hashlib.sha256(
            json.dumps([self.key(), what, np.asarray(idx).tolist()], sort_keys=True).encode()
        ).hexdigest()[:16]
        path = self.cache / f"data-{what}-{digest}.npy" if self.cache is not None else None
        if path is not None and path.exists():
            return torch.from_numpy(np.load(path)).permute(0, 3, 1, 2).contiguous()
        adv = self.progress(f"read {what}", len(idx)) if self.progress and len(idx) else None
        out = np.zeros((len(idx), self.size, self.size, 3), np.uint8)
        for j, i in enumerate(idx):
            out[j] = self.ds.load_image(int(i), self.size)
            if adv:
                adv(1)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, out)
            tmp.replace(path)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.arrays(self.tr_idx, "train"), torch.from_numpy(self.labels[self.tr_idx])

    def clean_indices(self, split: str) -> np.ndarray:
        """Indices of ``split`` that carry no annotated artifact."""
        idx = np.asarray(self.ds.indices(split), dtype=np.int64)
        carried = np.zeros(len(idx), dtype=bool)
        for m in self.membership.values():
            carried |= m[idx]
        return idx[~carried]

    def val_clean(self, artifact: str) -> torch.Tensor:
        """Validation images without any annotated artifact (the banks' calibration, §1.3)."""
        idx = self.clean_indices("val")
        if len(idx) == 0:
            raise ConfigError(
                f"{self.name}: no validation image without annotated artifacts, so the concept banks "
                "cannot be calibrated; give the dataset a val split with clean images"
            )
        return self.arrays(idx, "val-clean")

    def train_membership(self) -> dict[str, np.ndarray]:
        return {
            a: m[self.tr_idx].astype(np.int64) for a, m in self.membership.items() if m[self.tr_idx].any()
        }

    def rates(self, artifact: str) -> tuple[float, ...]:
        """The realised rate of ``artifact`` per class on the training split."""
        m, y = self.membership[artifact][self.tr_idx], self.labels[self.tr_idx]
        return tuple(float(m[y == k].mean()) if (y == k).any() else 0.0 for k in range(len(self.label_names)))

    def pairs(self, artifact: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError(f"{self.name} cannot render counterfactual pairs; use cav_data='membership'")

    def masks(self, idx: np.ndarray | Sequence[int], artifact: str) -> np.ndarray:
        """Masks of ``artifact`` (N, size, size) float32, zero where a sample does not carry it."""
        member = self.membership.get(artifact)
        out = np.zeros((len(idx), self.size, self.size), np.float32)
        if self.mask_source == "none" or member is None:
            return out
        for j, i in enumerate(idx):
            if member[int(i)]:
                out[j] = self.ds.mask(int(i), artifact, self.size)
        return out

    def train_masks(self, pos: np.ndarray, artifact: str) -> np.ndarray:
        return self.masks(self.tr_idx[np.asarray(pos, dtype=np.int64)], artifact)

    def eval_data(
        self,
        mcfg: ModelCfg,
        *,
        artifact: str,
        cav: np.ndarray,
        layer: str,
        max_artifact_samples: int,
        tcav_class: int,
        seed: int,
    ) -> EvalData:
        from medaudit.models.realeval import dataset_eval_data

        return dataset_eval_data(
            self,
            artifact=artifact,
            cav=cav,
            cav_layer=layer,
            max_artifact_samples=max_artifact_samples,
            tcav_class=tcav_class,
            seed=seed,
        )


BuildData = SynthDermData | DatasetData


def build_data(
    spec: str,
    synthderm: SynthDermConfig,
    size: int,
    cache: Path,
    artifact: str,
    progress: Progress | None = None,
    model: Any = None,
) -> BuildData:
    """The build's data: ``"synthderm"`` (or ``""``) renders ``synthderm`` (its own size), any
    other spec opens a dataset on disk (:func:`medaudit.models.data.registry.open_dataset`) read
    at ``size``, after reading every image and mask once where the dataset can check itself
    (``validate``): a bad file fails the build before anything is built. ``model`` (a model spec
    or ``ModelCfg``) says how images become ``size``²: its ``resize``/``crop_pct``, as served."""
    if spec in ("", "synthderm"):
        return SynthDermData(synthderm, cache, progress)
    from medaudit.models.data.registry import open_dataset

    ds = open_dataset(spec)
    if isinstance(ds, SynthDerm):  # a synthderm spec with options: still rendered by its generator
        return SynthDermData(ds.cfg, cache, progress)
    # read as the model fits images (a spec's resize/crop policy), so it is built on what it is served
    data = DatasetData(model_view(ds, model), _absolute(spec), size, cache, artifact, progress)
    if getattr(model, "resize", "resize") != "resize":
        data.fit = f"{model.resize}:{model.crop_pct}"
    validate = getattr(ds, "validate", None)
    # once per content (key): a re-run over unchanged files does not read them all again
    mark = cache / f"validated-{hashlib.sha256(json.dumps(data.key()).encode()).hexdigest()[:16]}"
    if callable(validate) and not mark.exists():
        validate(progress)
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    return data


def _absolute(spec: str) -> str:
    """``kind:relative/path?opts`` -> ``kind:/absolute/path?opts``, so a card names data another
    folder can open."""
    head, q, query = spec.partition("?")
    kind, sep, path = head.partition(":")
    if not sep or not path:
        return spec
    return f"{kind}:{Path(path).expanduser().resolve()}{q}{query}"


def _files(ds: AnnotatedDataset) -> list[str]:
    """Image files the dataset lists (``paths``), every file of its mask folder (``masks.root``,
    wherever an option put it; else ``root/masks``) and the annotation files at its ``root``,
    where it has them; sorted."""
    out = [str(p) for p in getattr(ds, "paths", ()) or ()]
    root = getattr(ds, "root", None)
    masks = getattr(getattr(ds, "masks", None), "root", None)
    if masks is None and root is not None:
        masks = Path(root) / "masks"
    if masks is not None and Path(masks).is_dir():
        out += [str(p) for p in Path(masks).rglob("*") if p.is_file()]
    if root is not None:
        out += [str(p) for p in Path(root).glob("*.json")] + [str(p) for p in Path(root).glob("*.csv")]
    return sorted(set(out))
