"""``synthderm``: controlled dermoscopy-like data with real, measurable shortcuts.

Each image is skin-toned textured background (sometimes hair) with one lesion. Benign lesions are
round/oval, uniform brown, smooth-bordered; malignant ones irregular, asymmetric and multi-coloured
(dark and blue-grey regions). Both are driven by one latent *severity* t ∈ [0, 1] whose class
distributions overlap, so a clean model tops out around 90–97%, not 100%.

Artifacts (``medaudit.models.data.artifacts``) are then drawn per a spurious-correlation spec: for each
artifact and class, the fraction of images that carry it. Membership is an exact stratified draw
(``round(p · n_class)`` samples per class and split, chosen by a seeded permutation) rather than the
paper's per-sample Bernoulli (method.md §5.1), so realised rates equal the spec up to rounding.
Appearance is seeded by ``(seed, index, artifact)`` as in method.md §5.2, so the band-aid on image
17 is the same in the training-distribution, attacked and exported variants.

Test variants (method.md §5.4): ``"ch"`` (training distribution), ``"clean"`` (no artifacts) and
``"attacked"`` (the chosen artifact on 100% of images, same indices, nothing else drawn).

More classes (``SynthDermConfig.preset("isic_like")``): nevus, melanoma and a basal-cell-like
lesion (pink, pearly rim, branching vessels; :mod:`~medaudit.models.data.synth_lesions`) whose
cues overlap, several photographs per lesion (same lesion, other skin, hair and artifacts, so a
split that ignores lesions leaks), and a band-aid shortcut on nevi. The binary default renders
exactly the bytes it always did: the extra draws happen only in the multi-class, grouped form.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from medaudit.models.data import artifact_styles as _styles
from medaudit.models.data import artifacts as _artifacts
from medaudit.models.data.synth_lesions import BCC_SEVERITY_AB, draw_vascular
from medaudit.models.errors import ConfigError, DatasetError

LABELS = ("benign", "malignant")
#: How each class name is drawn: benign (round, uniform), malignant (irregular, dark and
#: blue-grey regions) or bcc (pink, pearly rim, vessels; see ``synth_lesions``).
KINDS = {
    "benign": "benign",
    "nevus": "benign",
    "malignant": "malignant",
    "melanoma": "malignant",
    "bcc": "bcc",
}
ISIC_LIKE_CLASSES = ("nevus", "melanoma", "bcc")
ARTIFACT_ORDER = ("band_aid", "ruler", "skin_marker", "timestamp", "microscope")
_ARTIFACT_ID = {a: i for i, a in enumerate(ARTIFACT_ORDER)}

#: (p in benign, p in malignant); method-independent demo defaults: band-aids lean benign, rulers
#: and skin markers malignant; timestamp and microscope are off unless an experiment plants them.
DEFAULT_SPEC: dict[str, tuple[float, float]] = {
    "band_aid": (0.50, 0.03),
    "ruler": (0.05, 0.30),
    "skin_marker": (0.05, 0.15),
    "timestamp": (0.0, 0.0),
    "microscope": (0.0, 0.0),
}
#: The isic_like preset's rates per (nevus, melanoma, bcc): band-aids on (biopsied, ambiguous)
#: nevi, the shortcut a model learns; rulers and skin markers lean to melanoma and bcc.
ISIC_LIKE_SPEC: dict[str, tuple[float, ...]] = {
    "band_aid": (0.50, 0.03, 0.03),
    "ruler": (0.05, 0.30, 0.20),
    "skin_marker": (0.05, 0.15, 0.10),
    "timestamp": (0.0, 0.0, 0.0),
    "microscope": (0.0, 0.0, 0.0),
}
PRESETS = ("binary", "isic_like")
SPLITS = ("train", "val", "test")
#: Bump whenever rendering changes, so caches keyed by the config are not reused across versions.
GENERATOR_VERSION = 5
_N_ANG = 720
VARIANTS = ("ch", "clean", "attacked")


@dataclass(frozen=True)
class SynthDermConfig:
    """Everything that determines the bytes of a synthderm dataset."""

    seed: int = 0
    size: int = 128
    n_train: int = 1800
    n_val: int = 400
    n_test: int = 600
    p_malignant: float = 0.4
    #: Per artifact, the fraction of each class's images that carry it (one rate per class).
    spec: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_SPEC))
    hair_p: float = 0.3
    #: Severity of a *typical* lesion: Beta(a, b) for benign, Beta(b, a) for malignant.
    severity_ab: tuple[float, float] = (2.0, 10.0)
    #: Fraction of (benign, malignant) lesions that are *ambiguous*: severity uniform in
    #: ``ambiguous_zone`` whatever the class ("atypical naevi" and "early melanomas"). Their lesions
    #: carry only moderate evidence, which is where a shortcut decides. Without them a network reads
    #: severity too confidently to ever need the band-aid: on a single overlapping Beta severity
    #: the attack drop was 2-9 points at 64 and 128 px, even with band-aids on 0% of malignant
    #: training images (4 points); see the README's "How synthderm was tuned".
    p_ambiguous: tuple[float, ...] = (0.07, 0.65)
    ambiguous_zone: tuple[float, float] = (0.45, 0.65)
    #: Artifacts that mark a biopsy site: within benign images they go to ambiguous-looking lesions
    #: first (suspicious naevi get biopsied and covered), then to others, at the same overall rate.
    biopsy_artifacts: tuple[str, ...] = ("band_aid",)
    #: Opacity of the malignant colour cues (dark and blue-grey regions, gradient); 1 = full.
    cue_contrast: float = 1.0
    #: Class names in label order, each one of :data:`KINDS`.
    classes: tuple[str, ...] = LABELS
    #: Class frequencies; () for two classes drawn with ``p_malignant``.
    class_p: tuple[float, ...] = ()
    #: (min, max) photographs per lesion, drawn uniformly; the photographs of a lesion share its
    #: look and class and lie in one split. (1, 1): every image its own lesion.
    images_per_lesion: tuple[int, int] = (1, 1)
    #: Artifact looks (:mod:`~medaudit.models.data.artifact_styles`): ``"house"``, one look per
    #: artifact (the bytes synthderm always drew); ``"split"``, style families with some styles
    #: only in train, val or test (``style_split``); ``"all"``, every style in every split.
    styles: str = "house"
    #: ``{artifact: {"shared" | "train" | "val" | "test": (style, ...)}}`` for ``styles="split"``;
    #: empty: :data:`~medaudit.models.data.artifact_styles.DEFAULT_STYLE_SPLIT`.
    style_split: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ConfigError(f"size={self.size}: synthderm needs at least 32 px")
        k = len(self.classes)
        bad = [c for c in self.classes if c not in KINDS]
        if bad or k < 2 or len(set(self.classes)) != k:
            raise ConfigError(
                f"classes={self.classes}: give 2 or more distinct names from {', '.join(KINDS)}"
            )
        for art, rates in self.spec.items():
            if art not in _ARTIFACT_ID:
                raise ConfigError(f"unknown artifact {art!r} in spec; valid: {', '.join(ARTIFACT_ORDER)}")
            if len(rates) != k or not all(0 <= p <= 1 for p in rates):
                raise ConfigError(
                    f"spec[{art!r}] = {tuple(rates)}: rates must be in [0, 1], one per class {self.classes}"
                )
        if len(self.p_ambiguous) != k:
            raise ConfigError(f"p_ambiguous={self.p_ambiguous}: one fraction per class {self.classes}")
        if self.class_p and (
            len(self.class_p) != k or abs(sum(self.class_p) - 1) > 1e-6 or min(self.class_p) < 0
        ):
            raise ConfigError(f"class_p={self.class_p}: one frequency per class {self.classes}, summing to 1")
        if not self.class_p and k != 2:
            raise ConfigError(f"class_p is needed for {k} classes")
        lo, hi = self.images_per_lesion
        if not 1 <= lo <= hi:
            raise ConfigError(f"images_per_lesion={self.images_per_lesion}: need 1 <= min <= max")
        _styles.style_pools(self.styles, self.style_split)  # raises on a bad mode or split

    @property
    def plain(self) -> bool:
        """The original binary form: one image per lesion, labels drawn with ``p_malignant``."""
        return self.classes == LABELS and not self.class_p and self.images_per_lesion == (1, 1)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthDermConfig:
        """``"binary"`` (the default config) or ``"isic_like"`` (nevus, melanoma, bcc; 1–4
        photographs per lesion; band-aids on nevi), with ``overrides`` applied."""
        if name == "binary":
            return cls(**overrides)
        if name == "isic_like":
            base: dict[str, Any] = {
                "classes": ISIC_LIKE_CLASSES,
                "class_p": (0.5, 0.3, 0.2),
                "spec": dict(ISIC_LIKE_SPEC),
                "p_ambiguous": (0.07, 0.65, 0.3),
                "images_per_lesion": (1, 4),
            }
            return cls(**{**base, **overrides})
        raise ConfigError(f"unknown synthderm preset {name!r}; valid: {', '.join(PRESETS)}")

    def with_spec(self, **rates: tuple[float, ...]) -> SynthDermConfig:
        spec = dict(self.spec)
        spec.update(rates)
        return replace(self, spec=spec)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SynthDermConfig:
        """Inverse of :meth:`to_dict` (JSON lists back to tuples); unknown keys are ignored."""
        known = set(cls.__dataclass_fields__)
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        if "spec" in kw:
            kw["spec"] = {a: tuple(float(x) for x in r) for a, r in kw["spec"].items()}
        for key in ("severity_ab", "p_ambiguous", "ambiguous_zone", "class_p"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        for key in ("biopsy_artifacts", "classes"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "images_per_lesion" in kw:
            kw["images_per_lesion"] = tuple(int(x) for x in kw["images_per_lesion"])
        if "style_split" in kw:
            kw["style_split"] = {
                a: {k: tuple(v) for k, v in parts.items()} for a, parts in kw["style_split"].items()
            }
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "size": self.size,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_test": self.n_test,
            "p_malignant": self.p_malignant,
            "spec": {k: list(v) for k, v in self.spec.items()},
            "hair_p": self.hair_p,
            "severity_ab": list(self.severity_ab),
            "p_ambiguous": list(self.p_ambiguous),
            "ambiguous_zone": list(self.ambiguous_zone),
            "cue_contrast": self.cue_contrast,
            "biopsy_artifacts": list(self.biopsy_artifacts),
            # Only where they differ from the binary default, so the default's dict (and every
            # cache key made from it) stays what it was.
            **({} if self.classes == LABELS else {"classes": list(self.classes)}),
            **({"class_p": list(self.class_p)} if self.class_p else {}),
            **(
                {}
                if self.images_per_lesion == (1, 1)
                else {"images_per_lesion": list(self.images_per_lesion)}
            ),
            **self._styles_dict(),
        }

    def _styles_dict(self) -> dict[str, Any]:
        """The styles and the split in force (the default's written out, so the dict renders the
        same bytes if the default changes); nothing for the house look."""
        if self.styles == "house":
            return {}
        out: dict[str, Any] = {"styles": self.styles}
        if self.styles == "split":
            decl = self.style_split or _styles.DEFAULT_STYLE_SPLIT
            out["style_split"] = {a: {k: list(v) for k, v in parts.items()} for a, parts in decl.items()}
        return out


@dataclass(frozen=True)
class Sample:
    """One rendered image with its ground truth."""

    index: int
    image: np.ndarray  # H×W×3 uint8
    label: int
    artifacts: tuple[str, ...]
    masks: dict[str, np.ndarray]  # artifact -> H×W bool, exactly the pixels it drew
    lesion: np.ndarray  # H×W bool
    severity: float
    styles: Mapping[str, str] = field(default_factory=dict)  # artifact -> style drawn


class SynthDerm:
    """A deterministic synthderm dataset; ``sample(i)`` renders image ``i`` on the fly.

    It satisfies :class:`~medaudit.models.data.protocol.AnnotatedDataset` with the training
    distribution (variant ``"ch"``): every image has exact artifact masks.

    Attributes:
        lesion_of: Lesion index per image; the photographs of one lesion share it.
    """

    label_names: tuple[str, ...] = LABELS
    has_masks: bool = True
    mask_source: str = "ground_truth"

    def __init__(self, cfg: SynthDermConfig | None = None) -> None:
        self.cfg = cfg or SynthDermConfig()
        c = self.cfg
        n = c.n_train + c.n_val + c.n_test
        self.label_names = c.classes
        self._kind = tuple(KINDS[name] for name in c.classes)
        self.split_of = np.array(["train"] * c.n_train + ["val"] * c.n_val + ["test"] * c.n_test)
        if c.plain:
            rng = np.random.default_rng([c.seed, 0xC1A55])
            self.labels = (rng.random(n) < c.p_malignant).astype(np.int64)
            self.lesion_of = np.arange(n)
        else:
            self.labels, self.lesion_of = self._draw_lesions(n)
        self.severity = np.array(
            [self._severity(self._lesion_rng(i), int(y)) for i, y in enumerate(self.labels)]
        )
        self.membership = self._draw_membership()
        #: Per artifact and split, the styles its images draw from (:func:`artifact_styles.style_pools`).
        self.style_pools = _styles.style_pools(c.styles, c.style_split)
        yy, xx = np.mgrid[0 : c.size, 0 : c.size].astype(np.float32)
        self._yy, self._xx = yy, xx

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def ids(self) -> tuple[str, ...]:
        """Sample names, as the exports write them (``synth_000017``)."""
        return tuple(f"synth_{i:06d}" for i in range(len(self)))

    @property
    def groups(self) -> tuple[str, ...]:
        """Lesion per image (``lesion_000005``): several photographs of one lesion share it."""
        return tuple(f"lesion_{k:06d}" for k in self.lesion_of)

    @property
    def styled(self) -> bool:
        """Whether artifacts are drawn in style families (``styles`` other than ``"house"``)."""
        return self.cfg.styles != "house"

    def style_of(self, index: int, artifact: str) -> str:
        """The style (``artifact/style``) ``artifact`` takes on image ``index`` when drawn: from the
        pool of the image's split, by a generator seeded by ``(seed, index, artifact)``."""
        pool = self.style_pools[artifact][str(self.split_of[index])]
        if len(pool) == 1:
            return pool[0]
        rng = np.random.default_rng([self.cfg.seed, 0x5771E, index, _ARTIFACT_ID[artifact]])
        return pool[int(rng.integers(len(pool)))]

    def artifact_styles(self, split: str = "all") -> dict[str, dict[int, str]]:
        """``{artifact: {index: style}}`` of the images of ``split`` that carry each artifact in the
        training distribution (the ``artifact_ids`` of :meth:`artifact_ids`, with their styles)."""
        return {a: {i: self.style_of(i, a) for i in ids} for a, ids in self.artifact_ids(split).items()}

    def mask_source_of(self, artifact: str) -> str:
        """``"ground_truth"``: synthderm knows every pixel it drew."""
        return "ground_truth" if artifact in _ARTIFACT_ID else "none"

    def _draw_lesions(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and lesion index per image: lesions of 1..k photographs, within each split."""
        c = self.cfg
        rng = np.random.default_rng([c.seed, 0x1E5])
        lesion_of = np.empty(n, dtype=np.int64)
        lo, hi = c.images_per_lesion
        k, start = 0, 0
        for size in (c.n_train, c.n_val, c.n_test):
            i, end = start, start + size
            while i < end:
                m = min(int(rng.integers(lo, hi + 1)), end - i)
                lesion_of[i : i + m] = k
                k, i = k + 1, i + m
            start = end
        p = c.class_p or (1 - c.p_malignant, c.p_malignant)
        lesion_labels = rng.choice(len(c.classes), size=k, p=np.asarray(p) / np.sum(p))
        return lesion_labels[lesion_of].astype(np.int64), lesion_of

    def _lesion_rng(self, index: int) -> np.random.Generator:
        """The generator of image ``index``'s severity and lesion: the image's own in the plain
        binary form (the bytes it always had), its lesion's when photographs share a lesion."""
        c = self.cfg
        if c.plain:
            return np.random.default_rng([c.seed, index])
        return np.random.default_rng([c.seed, 0x1E5105, int(self.lesion_of[index])])

    # ------------------------------------------------------------------ membership

    def _draw_membership(self) -> dict[str, np.ndarray]:
        """Exact stratified draw per (artifact, split, class)."""
        c = self.cfg
        out: dict[str, np.ndarray] = {}
        for art in ARTIFACT_ORDER:
            rates = c.spec.get(art, (0.0,) * len(c.classes))
            member = np.zeros(len(self.labels), dtype=bool)
            rng = np.random.default_rng([c.seed, 0xA27, _ARTIFACT_ID[art]])
            lo, hi = c.ambiguous_zone
            for split in SPLITS:
                for cls, p in enumerate(rates):
                    idx = rng.permutation(np.flatnonzero((self.split_of == split) & (self.labels == cls)))
                    k = int(round(p * len(idx)))
                    if art in c.biopsy_artifacts and cls == 0:
                        # ambiguous-looking benign lesions first: they are the ones biopsied
                        amb = (self.severity[idx] >= lo) & (self.severity[idx] < hi)
                        idx = np.concatenate([idx[amb], idx[~amb]])
                    member[idx[:k]] = True
            out[art] = member
        return out

    def indices(self, split: str = "all") -> np.ndarray:
        if split == "all":
            return np.arange(len(self))
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}, all")
        return np.flatnonzero(self.split_of == split)

    def artifacts_of(self, index: int, variant: str = "ch", attack: str = "band_aid") -> tuple[str, ...]:
        if variant == "ch":
            return tuple(a for a in ARTIFACT_ORDER if self.membership[a][index])
        if variant == "clean":
            return ()
        if variant == "attacked":
            if attack not in _ARTIFACT_ID:
                raise ConfigError(f"unknown artifact {attack!r}; valid: {', '.join(ARTIFACT_ORDER)}")
            return (attack,)
        raise ConfigError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")

    def artifact_ids(self, split: str = "all") -> dict[str, list[int]]:
        """``{artifact: [indices]}`` in the training distribution, the annotation JSON format."""
        keep = set(self.indices(split).tolist())
        return {
            a: [int(i) for i in np.flatnonzero(m) if i in keep] for a, m in self.membership.items() if m.any()
        }

    def load_image(self, i: int, size: int | None = None) -> np.ndarray:
        """Image ``i`` as rendered, resized to ``size``² with bicubic when given."""
        return _resize(self.sample(i).image, size)

    def mask(self, i: int, artifact: str, size: int | None = None) -> np.ndarray:
        """H×W bool mask of exactly the pixels ``artifact`` drew in image ``i`` (nearest resize to
        ``size``² when given); all False when the image does not carry it.

        Raises:
            DatasetError: An artifact synthderm does not draw.
        """
        if artifact not in _ARTIFACT_ID:
            raise DatasetError(f"unknown artifact {artifact!r}; valid: {', '.join(ARTIFACT_ORDER)}")
        m = self.sample(i).masks.get(artifact)
        if m is None:
            side = size or self.cfg.size
            return np.zeros((side, side), dtype=bool)
        return m if size is None or m.shape[0] == size else _resize(m.astype(np.uint8) * 255, size) > 127

    def without(self, i: int, artifact: str, size: int | None = None) -> np.ndarray:
        """Image ``i`` as :meth:`load_image` renders it, but with ``artifact`` left undrawn: the
        counterfactual that differs from it on exactly ``mask(i, artifact)``. The artifact still
        claims its area, so every other artifact lands where it does in the image itself.

        Raises:
            DatasetError: An artifact synthderm does not draw.
        """
        if artifact not in _ARTIFACT_ID:
            raise DatasetError(f"unknown artifact {artifact!r}; valid: {', '.join(ARTIFACT_ORDER)}")
        return _resize(self._dress(self._base(i), "ch", "band_aid", skip=artifact).image, size)

    def config(self) -> dict[str, Any]:
        """The generator config (:meth:`SynthDermConfig.to_dict`), which renders these bytes again."""
        return self.cfg.to_dict()

    # ------------------------------------------------------------------ rendering

    def sample(self, index: int, variant: str = "ch", attack: str = "band_aid") -> Sample:
        return self._dress(self._base(index), variant, attack)

    def _base(self, index: int) -> Sample:
        """Image ``index`` before its artifacts: background, lesion and hair, all from the
        generator seeded by ``(seed, index)``; ``masks`` holds the occupied area (the dilated
        lesion) under the key ``""``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        c = self.cfg
        label = int(self.labels[index])
        rng = np.random.default_rng([c.seed, index])
        # One generator for everything in the plain form; the lesion's own for its severity, shape
        # and colour when photographs share a lesion (the image's for skin and hair).
        lrng = rng if c.plain else self._lesion_rng(index)
        t = self._severity(lrng, label)  # the first draw: equals self.severity[index]
        img = self._background(rng)
        lesion = self._lesion(img, lrng, t)
        if "bcc" in self._kind:
            draw_vascular(img, lesion, lrng, self._kind[label], c.cue_contrast)
        if rng.random() < c.hair_p:
            self._hair(img, rng)
        occupied = _dilate(lesion, max(2, c.size // 40))
        return Sample(index, img, label, (), {"": occupied}, lesion, t)

    def _dress(
        self, base: Sample, variant: str, attack: str, copy: bool = False, skip: str | None = None
    ) -> Sample:
        """``base`` with the artifacts of ``variant``, each from its own generator seeded by
        ``(seed, index, artifact)``. They draw into ``base.image`` unless ``copy``. ``skip`` is
        drawn on a scratch copy: it keeps its mask and its area, and leaves the image as it was."""
        c, index = self.cfg, base.index
        arts = self.artifacts_of(index, variant, attack)
        img = base.image.copy() if copy and arts else base.image
        occupied = base.masks[""]
        masks: dict[str, np.ndarray] = {}
        styles: dict[str, str] = {}
        for art in arts:
            arng = np.random.default_rng([c.seed, index, 1 + _ARTIFACT_ID[art]])
            canvas = img.copy() if art == skip else img
            if self.styled:
                styles[art] = self.style_of(index, art)
                m = _styles.render(styles[art], canvas, occupied, arng)
            else:
                styles[art] = f"{art}/{_styles.HOUSE}"
                m = _artifacts.render(art, canvas, occupied, arng)
            masks[art] = m
            occupied = occupied | m
        return Sample(index, img, base.label, arts, masks, base.lesion, base.severity, styles)

    def _severity(self, rng: np.random.Generator, label: int) -> float:
        c = self.cfg
        if rng.random() < c.p_ambiguous[label]:
            return float(rng.uniform(*c.ambiguous_zone))
        a, b = c.severity_ab
        kind = self._kind[label]
        if kind == "bcc":
            return float(rng.beta(*BCC_SEVERITY_AB))
        return float(rng.beta(b, a) if kind == "malignant" else rng.beta(a, b))

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        S = self.cfg.size
        base = np.array([rng.uniform(195, 235), rng.uniform(145, 185), rng.uniform(115, 155)], np.float32)
        low = _smooth_noise(rng, S, 5) * rng.uniform(6, 14)
        fine = rng.normal(0, 3.0, (S, S, 1)).astype(np.float32)
        img = base[None, None, :] + low[..., None] * np.array([1.0, 0.9, 0.8], np.float32) + fine
        return np.clip(img, 0, 255).astype(np.uint8)

    def _lesion(self, img: np.ndarray, rng: np.random.Generator, t: float) -> np.ndarray:
        S = self.cfg.size
        cy, cx = ((S - 1) / 2 + rng.uniform(-0.06, 0.06, 2) * S).tolist()
        R = float(S * rng.uniform(0.14, 0.22) * (1 + 0.15 * t))
        dy, dx = self._yy - cy, self._xx - cx
        rho = np.sqrt(dx * dx + dy * dy)
        # The border radius depends on the angle only: evaluate it on a 1-D table of angles and
        # look it up, instead of evaluating every harmonic at every pixel.
        ang = np.linspace(-np.pi, np.pi, _N_ANG, endpoint=False)
        ecc = rng.uniform(0.0, 0.12) + 0.15 * t * rng.random()
        phi0 = rng.uniform(0, 2 * np.pi)
        r_tab = 1 + ecc * np.cos(2 * (ang - phi0))  # ellipse: asymmetry grows with t
        n_harm = 2 + int(round(7 * t))
        for k in range(3, 3 + n_harm):  # harmonics: irregularity grows with t
            amp = (0.015 + 0.10 * t) * rng.uniform(0.3, 1.0) / np.sqrt(k - 2)
            r_tab = r_tab + amp * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
        r_tab = (R * np.minimum(r_tab, 1.45)).astype(np.float32)  # stay inside the artifact-free centre
        a_idx = ((np.arctan2(dy, dx) + np.pi) * (_N_ANG / (2 * np.pi))).astype(np.int32) % _N_ANG
        r_b = r_tab[a_idx]
        edge = float(1.0 + 2.5 * t * rng.random())
        alpha = np.clip((r_b - rho) / edge + 0.5, 0.0, 1.0)
        lesion = alpha > 0.02
        # colour: uniform brown for benign; malignant adds dark and blue-grey regions and a gradient
        brown = np.array([rng.uniform(110, 150), rng.uniform(70, 95), rng.uniform(45, 65)], np.float32)
        tex = _smooth_noise(rng, S, 8)
        col = brown[None, None, :] * (1 + 0.06 * tex[..., None])
        grad_dir = rng.uniform(0, 2 * np.pi)
        grad = (dx * float(np.cos(grad_dir) / R) + dy * float(np.sin(grad_dir) / R))[..., None]
        contrast = self.cfg.cue_contrast
        col = col * (1 - 0.25 * contrast * t * np.clip(grad, -1, 1))
        dark_frac = np.clip(t - 0.3, 0, 1) * 0.55
        if dark_frac > 0:
            n1 = _smooth_noise(rng, S, 7)
            thr = np.quantile(n1[lesion], 1 - dark_frac) if lesion.any() else np.inf
            w = np.clip((n1 - thr) * 4, 0, 1)[..., None] * contrast
            col = col * (1 - w) + np.array([45, 32, 30], np.float32) * w
        grey_frac = np.clip(t - 0.45, 0, 1) * 0.6
        if grey_frac > 0:
            n2 = _smooth_noise(rng, S, 7)
            thr = np.quantile(n2[lesion], 1 - grey_frac) if lesion.any() else np.inf
            w = np.clip((n2 - thr) * 4, 0, 1)[..., None] * (0.85 * contrast)
            col = col * (1 - w) + np.array([105, 115, 135], np.float32) * w
        a3 = alpha[..., None]
        out = img.astype(np.float32) * (1 - a3) + col * a3
        img[...] = np.clip(out, 0, 255).astype(np.uint8)
        return lesion

    def _hair(self, img: np.ndarray, rng: np.random.Generator) -> None:
        S = self.cfg.size
        pil = Image.fromarray(img)
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(1, 5))):
            p0, p1, p2 = rng.uniform(0, S, (3, 2))
            ts = np.linspace(0, 1, 12)[:, None]
            pts = (1 - ts) ** 2 * p0 + 2 * (1 - ts) * ts * p1 + ts**2 * p2
            shade = int(rng.uniform(30, 70))
            d.line([tuple(p) for p in pts], fill=(shade, shade - 10 if shade > 10 else 0, 10), width=1)
        img[...] = np.asarray(pil)

    # ------------------------------------------------------------------ bulk access

    def iter_samples(
        self, split: str = "all", variant: str = "ch", attack: str = "band_aid"
    ) -> Iterator[Sample]:
        for i in self.indices(split):
            yield self.sample(int(i), variant, attack)

    def arrays(
        self, split: str, variant: str = "ch", attack: str = "band_aid", progress: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """All images of a split as ``(N×H×W×3 uint8, N labels)``."""
        X, y = self.variant_arrays(split, (variant,), attack, progress)
        return X[variant], y

    def variant_arrays(
        self, split: str, variants: tuple[str, ...], attack: str = "band_aid", progress: Any = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Several variants of a split, ``({variant: N×H×W×3 uint8}, N labels)``, in one pass.

        Each image's background, lesion and hair (~90 % of its rendering time) are drawn once and
        every variant adds its artifacts to a copy: the bytes :meth:`arrays` gives per variant.
        """
        idx = self.indices(split)
        for v in variants:  # an unknown variant or attack fails before any rendering
            self.artifacts_of(0, v, attack)
        S = self.cfg.size
        out = {v: np.empty((len(idx), S, S, 3), np.uint8) for v in variants}
        for j, i in enumerate(idx):
            base = self._base(int(i))
            for v in variants:
                out[v][j] = self._dress(base, v, attack, copy=True).image
            if progress is not None:
                progress(1)
        return out, self.labels[idx].copy()

    @cached_property
    def realised_rates(self) -> dict[str, dict[str, tuple[float, ...]]]:
        """``{split: {artifact: (rate in class 0, rate in class 1, ...)}}`` as drawn."""
        out: dict[str, dict[str, tuple[float, ...]]] = {}
        for split in SPLITS:
            sel = self.split_of == split
            out[split] = {
                a: tuple(
                    float(m[sel & (self.labels == k)].mean()) if (sel & (self.labels == k)).any() else 0.0
                    for k in range(len(self.label_names))
                )
                for a, m in self.membership.items()
            }
        return out

    def export(
        self,
        root: str | Path,
        variant: str = "ch",
        attack: str = "band_aid",
        progress: Any = None,
        *,
        layout: str = "folder",
        masks: bool = True,
        mask_dir: str | Path | None = None,
    ) -> Path:
        """Write the images, ``artifacts.csv``, masks and the tables of ``layout`` to ``root``.

        ``"folder"`` is the generic folder dataset's layout (:mod:`~medaudit.models.data.folder`),
        ``"isic2019"`` and ``"chexpert"`` the published ones (:mod:`~medaudit.models.data.synth_export`),
        so an exported synthderm reads back like real data. ``masks=False`` writes no masks;
        ``mask_dir`` holds them back in a folder of their own.
        """
        from medaudit.models.data.synth_export import export

        return export(self, root, layout, variant, attack, masks=masks, mask_dir=mask_dir, progress=progress)


def _resize(img: np.ndarray, size: int | None) -> np.ndarray:
    """``img`` resized to ``size``²: bicubic for RGB, nearest for a single-channel mask."""
    if size is None or (img.shape[0] == size and img.shape[1] == size):
        return img
    resample = Image.Resampling.NEAREST if img.ndim == 2 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(img).resize((size, size), resample))


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency noise: a coarse random grid upsampled bilinearly."""
    g = rng.normal(0, 1, (grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.Resampling.BILINEAR))


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)² square, separable: rows then columns."""
    rows = mask.copy()
    for s in range(1, r + 1):
        rows[s:] |= mask[:-s]
        rows[:-s] |= mask[s:]
    out = rows.copy()
    for s in range(1, r + 1):
        out[:, s:] |= rows[:, :-s]
        out[:, :-s] |= rows[:, s:]
    return out
