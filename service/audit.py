"""One request's audit, transport-free: predict (ONNX Runtime), explain (LRP), score concepts.

An :class:`AuditEngine` is built once per served version at service start (:meth:`AuditEngine.
from_store`): the verified torch model becomes an :class:`~models.xai.lrp.Explainer` (canonized
once), the ONNX graph an ONNX Runtime session, and the version's concept bank is kept beside them.
Per request:

* :meth:`AuditEngine.predict`: one batched ONNX Runtime run, probabilities by softmax.
* :meth:`AuditEngine.audit`: one LRP call seeded at the predicted class *and*, chosen from that
  call's own forward pass, at the CAV of the concept each image shows (method.md §2.1). It gives
  the class heatmap, the max-pooled activations for concept scores (§1.4), the class relevance
  at the CAV layer for each concept's relevance share, and the concept-conditioned heatmap whose
  binarisation (§2.2) is the localization mask of a concept judged present.
* :func:`compare`: one image through several versions, side by side, with their agreement.

The engine scores; it does not decide. Whether a result is flagged for review is the flag
policy's call (:func:`medaudit.service.flags.policy.evaluate`), made once per result by whoever
answers the request.

The audit's prediction comes from the torch forward pass the heatmap explains, not from ONNX
Runtime: the explanation must be of the logits it reports (the two agree to float tolerance,
which ``medaudit.models.export.check_parity`` tests at export).
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medaudit.models.export import INPUT_NAME, OUTPUT_NAME, ort_session
from medaudit.models.xai.concepts import relevance_share
from medaudit.models.xai.localize import binarize
from medaudit.models.xai.lrp import ConceptTarget, Explainer
from medaudit.models.xai.validation import heatmap_refusal

# the served-name rule is service.config's; re-exported where served versions are loaded
from medaudit.service.config import DEFAULT_MODEL_NAME as DEFAULT_MODEL_NAME
from medaudit.service.config import usable_cpus
from medaudit.service.config import version_tag as version_tag
from medaudit.service.errors import UnknownModelVersionError
from medaudit.service.flags.policy import PolicyConfig, PolicyDecision, evaluate
from medaudit.service.inputs import DecodedImage, to_model_input
from medaudit.service.store import LoadedVersion, load_version

Image_ = DecodedImage | np.ndarray


@dataclass(frozen=True)
class Prediction:
    """One image's prediction by one version."""

    version: str
    label: str
    class_index: int
    probabilities: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "label": self.label,
            "class_index": self.class_index,
            "probabilities": dict(self.probabilities),
        }


@dataclass(frozen=True)
class ConceptScore:
    """One concept on one image (method.md §1.4) with its relevance share and, if present, mask.

    Attributes:
        concept: Concept (artifact) name.
        score: ⟨φ(x), v⟩ at the bank's layer.
        percentile: Calibrated percentile among clean validation scores (0–100).
        present: ``score`` above the bank's threshold at the chosen FPR.
        threshold: That threshold.
        relevance_share: Share of the predicted class's relevance at the CAV layer along v, [0, 1].
        mask_png: Base64 PNG of the binarised concept-conditioned heatmap, for present concepts.
    """

    concept: str
    score: float
    percentile: float
    present: bool
    threshold: float
    relevance_share: float
    mask_png: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "concept": self.concept,
            "score": self.score,
            "percentile": self.percentile,
            "present": self.present,
            "threshold": self.threshold,
            "relevance_share": self.relevance_share,
            "mask_png": self.mask_png,
        }


@dataclass(frozen=True, eq=False)
class AuditResult:
    """One image's audit by one version.

    Attributes:
        prediction: From the explained forward pass.
        heatmap_png: Base64 PNG: the model-size input with the class heatmap overlaid
            (red positive, blue negative relevance); ``None`` for a screen
            (:meth:`AuditEngine.screen`), which computes no heatmap.
        heatmap: The raw class heatmap (H, W) as float16, if asked for.
        concepts: One score per concept of the version's bank (what the flag policy reads).
        layer: The bank's CAV layer.
        features: The spatially max-pooled activations φ(x) at ``layer`` (float32, (C,)): what
            the concept scores are dot products of. Not in the JSON; flags store it so that
            reviewed flags can refit the bank (``medaudit refine-cav``).
        heatmap_note: Why the heatmap and masks are withheld (``heatmap_png`` ``None``): the
            version's model family has no validated LRP rules (models/xai/validation.py). In
            the JSON only when set.
        image: The model-size input (H, W, 3) uint8 the heatmap is over. Not in the JSON; flags
            store it so that a reviewer sees the bare image under the overlays.
    """

    prediction: Prediction
    heatmap_png: str | None
    concepts: tuple[ConceptScore, ...]
    layer: str
    heatmap: np.ndarray | None = field(default=None, repr=False)
    features: np.ndarray | None = field(default=None, repr=False)
    heatmap_note: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> AuditResult:
        """An :func:`medaudit.service.audit_pool.audit_jobs` answer with what travels beside its JSON:
        ``features``, the raw class ``heatmap`` (float16; used over the JSON's, which is there only
        when the caller asked for it) and the ``pixels`` the caller sent (the model-size input)."""
        r = cls.from_json(answer["result"], answer.get("features"))
        heat, pixels = answer.get("heatmap"), answer.get("pixels")
        return replace(
            r,
            heatmap=r.heatmap if heat is None else np.asarray(heat, dtype=np.float16),
            image=None if pixels is None else np.asarray(pixels, dtype=np.uint8),
        )

    @classmethod
    def from_json(cls, body: Mapping[str, Any], features: np.ndarray | None = None) -> AuditResult:
        """The inverse of :meth:`to_json` (what the batched :class:`medaudit.service.api.Auditor`
        returns); a ``flag`` the body may carry is the policy's, not the result's, and is ignored."""
        p = body["prediction"]
        heat = body.get("heatmap")
        return cls(
            prediction=Prediction(p["version"], p["label"], int(p["class_index"]), dict(p["probabilities"])),
            heatmap_png=body["heatmap_png"],
            concepts=tuple(ConceptScore(**c) for c in body["concepts"]),
            layer=body["layer"],
            heatmap=None
            if heat is None
            else np.frombuffer(base64.b64decode(heat["data"]), dtype="<f2").reshape(heat["shape"]),
            features=None if features is None else np.asarray(features, dtype=np.float32),
            heatmap_note=body.get("heatmap_note"),
        )

    def to_json(self) -> dict[str, Any]:
        raw = None
        if self.heatmap is not None:
            h = np.ascontiguousarray(self.heatmap, dtype="<f2")
            raw = {"dtype": "float16", "shape": list(h.shape), "data": base64.b64encode(h.tobytes()).decode()}
        return {
            "prediction": self.prediction.to_json(),
            "heatmap_png": self.heatmap_png,
            "heatmap": raw,
            "layer": self.layer,
            "concepts": [c.to_json() for c in self.concepts],
            **({"heatmap_note": self.heatmap_note} if self.heatmap_note else {}),
        }


@dataclass(frozen=True, eq=False)
class Comparison:
    """One image audited by several versions, side by side, each with the flag policy's decision."""

    results: Mapping[str, AuditResult]
    decisions: Mapping[str, PolicyDecision]

    @classmethod
    def decide(cls, results: Mapping[str, AuditResult], policy: PolicyConfig | None = None) -> Comparison:
        """The results with the policy's decision on each (no corrected version is asked here)."""
        return cls(results, {v: evaluate(r, policy) for v, r in results.items()})

    @property
    def labels_agree(self) -> bool:
        return len({r.prediction.label for r in self.results.values()}) == 1

    @property
    def flags_agree(self) -> bool:
        return len({d.flagged for d in self.decisions.values()}) == 1

    def to_json(self) -> dict[str, Any]:
        return {
            "versions": list(self.results),
            "results": {
                v: {**r.to_json(), "flag": self.decisions[v].to_json()} for v, r in self.results.items()
            },
            "agreement": {"label": self.labels_agree, "flag": self.flags_agree},
        }


# --------------------------------------------------------------------------------- images -> PNG


def png_base64(arr: np.ndarray) -> str:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) (RGBA) array -> base64 PNG.

    zlib level 1: a 128 px heatmap overlay encodes in 1.2 ms instead of 4.9 ms (PIL's default 6)
    for 6% more bytes; an audit encodes one overlay per image plus one mask per present concept.
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def overlay(rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The image with a heatmap blended in: red where relevance is positive, blue where negative."""
    h = np.asarray(heatmap, dtype=np.float64)
    m = float(np.abs(h).max())
    h = h / m if m > 0 else np.zeros_like(h)
    colour = np.zeros((*h.shape, 3))
    colour[..., 0] = np.clip(h, 0, 1)
    colour[..., 2] = np.clip(-h, 0, 1)
    weight = alpha * np.abs(h)[..., None]
    out = (1 - weight) * rgb.astype(np.float64) + weight * 255.0 * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def heat_layer(heatmap: np.ndarray) -> np.ndarray:
    """The heatmap alone as an RGBA layer (H, W, 4) uint8: red where relevance is positive, blue
    where negative, colour and alpha both |h| / max|h|. Drawn over the image at opacity ``a`` it
    gives exactly :func:`overlay` with ``alpha=a`` (up to rounding), so a viewer can toggle it."""
    h = np.asarray(heatmap, dtype=np.float64)
    m = float(np.abs(h).max()) if h.size else 0.0
    h = h / m if m > 0 else np.zeros_like(h)
    out = np.zeros((*h.shape, 4), dtype=np.uint8)
    out[..., 0] = np.rint(255.0 * np.clip(h, 0, 1))
    out[..., 2] = np.rint(255.0 * np.clip(-h, 0, 1))
    out[..., 3] = np.rint(255.0 * np.abs(h))
    return out


# --------------------------------------------------------------------------------- engine


def predictions(logits: np.ndarray, labels: Sequence[str], version: str) -> list[Prediction]:
    """Softmax of (B, K) logits as :class:`Prediction` objects."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return [
        Prediction(
            version=version,
            label=labels[int(row.argmax())],
            class_index=int(row.argmax()),
            probabilities={lab: float(q) for lab, q in zip(labels, row, strict=True)},
        )
        for row in p
    ]


class VersionPredictor:
    """Predictions of one version; subclasses say how the logits are computed.

    Args:
        loaded: A verified version from the store.
        ort_threads: ONNX Runtime intra-op threads (0: its default; unused by torch).
    """

    def __init__(self, loaded: LoadedVersion, ort_threads: int = 0) -> None:
        self.tag = loaded.tag
        self.version = loaded.tag.split(":", 1)[1]
        self.cfg = loaded.cfg

    @classmethod
    def from_store(
        cls, version: str, home: str | Path | None = None, ort_threads: int = 0
    ) -> VersionPredictor:
        return cls(load_version(version_tag(version), home=home), ort_threads)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.cfg.input_size[1]), int(self.cfg.input_size[2])

    def pixels(self, images: Sequence[Image_]) -> np.ndarray:
        """Images resized to the model input: (B, H, W, 3) uint8 (small enough to ship to a batcher)."""
        if not images:
            raise ValueError("no images")
        policy, crop = self.cfg.resize, self.cfg.crop_pct
        return np.stack([to_model_input(im, self.size, policy, crop) for im in images])

    def _inputs(self, rgb: np.ndarray) -> torch.Tensor:
        return self.cfg.normalize(torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2))

    def logits(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_pixels(self, rgb: np.ndarray) -> list[Prediction]:
        """Predictions for (B, H, W, 3) uint8 model-size images, one model run."""
        return predictions(self.logits(rgb), self.cfg.labels, self.version)

    def predict(self, images: Sequence[Image_]) -> list[Prediction]:
        """Predictions for a batch of images, one model run."""
        return self.predict_pixels(self.pixels(images))


class OnnxPredictor(VersionPredictor):
    """Through ONNX Runtime (what ``/predict`` serves; providers chosen by ``medaudit.models.export``)."""

    def __init__(self, loaded: LoadedVersion, ort_threads: int = 0) -> None:
        super().__init__(loaded, ort_threads)
        self.session = ort_session(loaded.onnx_path, threads=ort_threads)
        self._mean = np.asarray(self.cfg.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(self.cfg.std, dtype=np.float32).reshape(1, -1, 1, 1)

    def normalized(self, rgb: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> the model's (B, 3, H, W) float32 input, in numpy.

        The same float32 operations, in the same order, as :meth:`medaudit.models.registry.ModelCfg.normalize`
        (``/255``, ``-mean``, ``/std``), so the input is bit-identical to the torch path's. Not torch
        on purpose: a torch op here wakes torch's OpenMP pool, whose threads then spin on the cores
        ONNX Runtime is about to use; that doubled the time of a batch-1 run (15 ms against 7 ms).
        """
        x = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32)
        x /= np.float32(255)
        x -= self._mean
        x /= self._std
        return x

    def logits(self, rgb: np.ndarray) -> np.ndarray:
        x = self.normalized(np.asarray(rgb, dtype=np.uint8))
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], dtype=np.float64)


class TorchPredictor(VersionPredictor):
    """Through the eager torch model: the baseline ONNX Runtime is measured against.

    ``MEDAUDIT_PREDICT_BACKEND=torch`` serves ``/predict`` with it (benchmarks/serve.py compares
    the two in one run).
    """

    def __init__(self, loaded: LoadedVersion, ort_threads: int = 0) -> None:
        super().__init__(loaded, ort_threads)
        self.model = loaded.model.eval()

    def logits(self, rgb: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(self._inputs(rgb).float()).double().numpy()


PREDICT_BACKENDS: dict[str, type[VersionPredictor]] = {"onnx": OnnxPredictor, "torch": TorchPredictor}


class AuditEngine:
    """Predict, explain and score for one served version. Build once, call often.

    Args:
        loaded: A verified version from the store.
        fpr: False-positive rate of the concepts' presence thresholds, in (0, 1); ``None`` uses
            each bank's own target FPR.
        ort_threads: ONNX Runtime intra-op threads (0: its default).
        device: Where the LRP engine runs (``"cpu"``, ``"cuda:0"``; see
            :func:`medaudit.service.config.audit_device`). Inputs are prepared and results returned on the
            CPU either way; predictions stay on ONNX Runtime, whose providers pick the GPU apart.
    """

    def __init__(
        self,
        loaded: LoadedVersion,
        fpr: float | None = None,
        ort_threads: int = 0,
        device: str | torch.device = "cpu",
    ):
        if fpr is not None and not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must lie in (0, 1), got {fpr!r}")
        self.device = torch.device(device)
        self.tag = loaded.tag
        self.version = loaded.tag.split(":", 1)[1]
        self.cfg = loaded.cfg
        self.card = loaded.card
        self.bank = loaded.bank
        self.fpr = fpr
        self.explainer = Explainer(loaded.model, loaded.cfg).to(self.device)
        #: Why this version's heatmaps are withheld (its family's rules are not validated), or None.
        self.heatmap_note = heatmap_refusal(loaded.cfg.canonizer)
        if self.heatmap_note:
            logging.getLogger(__name__).warning("%s: %s", self.tag, self.heatmap_note)
        #: Per-image host work on a thread pool (see :meth:`_map`): on by default with a GPU.
        self.parallel_host = self.device.type != "cpu"
        self.predictor = OnnxPredictor(loaded, ort_threads)
        #: Each concept's CAV as a float32 tensor: the seeds of the concept-conditioned heatmaps.
        self._cavs = {
            c: torch.tensor(np.asarray(self.bank[c].v), dtype=torch.float32, device=self.device)
            for c in self.bank
        }
        #: The bank's concepts in order, and their CAVs as rows plus a zero row last: row ``k`` is
        #: the mask seed of concept ``k``, row ``-1`` the seed of an image that shows none.
        self._names = list(self.bank)
        cavs = torch.stack([self._cavs[c] for c in self._names])
        self._seed_rows = torch.cat([cavs, cavs.new_zeros(1, cavs.shape[1])])

    @classmethod
    def from_store(
        cls,
        version: str,
        home: str | Path | None = None,
        fpr: float | None = None,
        ort_threads: int = 0,
        device: str | torch.device = "cpu",
    ) -> AuditEngine:
        """Loads (sha256-verified) ``version`` from the BentoML store and builds its engine."""
        return cls(load_version(version_tag(version), home=home), fpr, ort_threads, device)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.cfg.input_size[1]), int(self.cfg.input_size[2])

    def _inputs(self, images: Sequence[Image_]) -> tuple[np.ndarray, torch.Tensor]:
        rgb = self.predictor.pixels(images)  # (B, H, W, 3) uint8
        return rgb, self.cfg.normalize(torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous())

    def predict(self, images: Sequence[Image_]) -> list[Prediction]:
        """Predictions for a batch of images, one ONNX Runtime run."""
        return self.predictor.predict(images)

    def audit(
        self, images: Sequence[Image_], *, raw_heatmap: bool = False, overlays: bool = True
    ) -> list[AuditResult]:
        """Full audits for a batch of images.

        ``overlays=False`` skips the heatmap overlay PNGs (``heatmap_png`` ``None``): host work for
        callers that keep the raw heatmap instead (``medaudit scan --heatmaps``).

        One LRP call (one forward, one batched backward) gives the class heatmap, the pooled
        activations that score every concept, the class relevance at the CAV layer for the
        shares, and, through a second seed chosen between the forward and the backward, each
        image's mask for the first concept present on it (a ``ConceptTarget`` whose vector is
        a function of the forward: no second forward). On clean traffic that seed is zero and
        is skipped, so the audit costs one backward. Only images showing two or more concepts
        need one more call, for their other concepts' masks.
        """
        rgb, x = self._inputs(images)
        layer = self.bank.layer
        names = self._names
        chosen: dict[str, Any] = {}

        def first_present(pooled: torch.Tensor) -> torch.Tensor:
            scores = self.bank.score(pooled.double().cpu().numpy(), self.fpr)
            present = np.stack([np.asarray(scores[c].present, dtype=bool) for c in names])  # (K, B)
            pick = np.where(present.any(0), present.argmax(0), -1)
            chosen.update(scores=scores, pick=pick)
            return self._seed_rows[torch.as_tensor(pick, device=self.device)]  # -1: the zero row

        e = self.explainer.explain(
            x, ["pred", ConceptTarget(layer, first_present)], cav_layers=[layer], relevance_layers=[layer]
        )
        scores, pick = chosen["scores"], chosen["pick"]
        preds = predictions(_numpy(e.logits), self.cfg.labels, self.version)
        pooled = _numpy(e.activations[layer])
        class_rel = _channel_relevance(e.relevance[layer][0])  # (B, C), seeded at the class
        shares = {c: relevance_share(class_rel, self.bank[c].v) for c in self.bank}
        withheld = self.heatmap_note is not None  # never shown blank or wrong: no heatmap, no masks
        # host copies only of what is asked for: the class heatmap for overlays or raw heatmaps,
        # the concept-seeded one where some image shows a concept
        heat = _numpy(e.heatmaps[0]) if not withheld and (overlays or raw_heatmap) else None  # (B, H, W)
        first = [(b, names[k]) for b, k in enumerate(pick) if k >= 0 and not withheld]
        masks: dict[tuple[int, str], str] = {}
        if first:
            seeded = _numpy(e.heatmaps[1])  # (B, H, W): each image's first present concept
            pngs_first = self._map(lambda p: png_base64(binarize(seeded[p[0]]) * 255), first)
            masks = dict(zip(first, pngs_first, strict=True))
        if not withheld:
            masks.update(self._masks(x, scores, done=set(masks)))
        pngs: list[str | None] = (
            [None] * len(preds)
            if heat is None or not overlays
            else list(self._map(lambda b: png_base64(overlay(rgb[b], heat[b])), range(len(preds))))
        )
        out = []
        for b, pred in enumerate(preds):
            out.append(
                AuditResult(
                    prediction=pred,
                    heatmap_png=pngs[b],
                    concepts=self._concepts(scores, shares, b, masks),
                    layer=layer,
                    heatmap=heat[b].astype(np.float16) if raw_heatmap and heat is not None else None,
                    features=pooled[b].astype(np.float32),
                    heatmap_note=self.heatmap_note,
                    image=rgb[b],
                )
            )
        return out

    def screen(self, images: Sequence[Image_]) -> list[AuditResult]:
        """What :meth:`audit` gives the flag policy, without heatmaps or masks, for a batch of images.

        The prediction, each concept's score, percentile and presence (method.md §1.4) and its
        relevance share come from one LRP call whose backward stops at the CAV layer ℓ
        (``Explainer.explain(heatmaps=False)``): the class relevance at ℓ depends only on the
        layers above it (ResNet-18 at ``identity_2``: the last of four stages), and the forward
        up to ℓ records no autograd graph. The same forward, the same relevance at ℓ and the same
        scoring as :meth:`audit`, so the same scores, presence, shares and flag decision on the
        same batch (tests/unit/test_screening.py). ``heatmap_png`` is ``None``, masks too.
        """
        _, x = self._inputs(images)
        layer = self.bank.layer
        e = self.explainer.explain(x, ["pred"], cav_layers=[layer], relevance_layers=[layer], heatmaps=False)
        preds = predictions(_numpy(e.logits), self.cfg.labels, self.version)
        pooled = _numpy(e.activations[layer])
        scores = self.bank.score(pooled, self.fpr)
        class_rel = _channel_relevance(e.relevance[layer][0])
        shares = {c: relevance_share(class_rel, self.bank[c].v) for c in self.bank}
        return [
            AuditResult(
                prediction=pred,
                heatmap_png=None,
                concepts=self._concepts(scores, shares, b, {}),
                layer=layer,
                features=pooled[b].astype(np.float32),
            )
            for b, pred in enumerate(preds)
        ]

    def _concepts(
        self,
        scores: Mapping[str, Any],
        shares: Mapping[str, np.ndarray],
        b: int,
        masks: Mapping[tuple[int, str], str],
    ) -> tuple[ConceptScore, ...]:
        """Image ``b``'s score of every concept of the bank, in bank order (audits and screens)."""
        return tuple(
            ConceptScore(
                concept=c,
                score=float(scores[c].score[b]),
                percentile=float(scores[c].percentile[b]),
                present=bool(scores[c].present[b]),
                threshold=float(scores[c].threshold),
                relevance_share=float(shares[c][b]),
                mask_png=masks.get((b, c)),
            )
            for c in self.bank
        )

    def _masks(
        self, x: torch.Tensor, scores: Mapping[str, Any], done: set[tuple[int, str]] | None = None
    ) -> dict[tuple[int, str], str]:
        """Localization masks (method.md §2.1–2.2) of the present concepts: ``(image, concept) -> PNG``.

        One LRP call over the (image, concept) pairs that are present (less those in ``done``),
        each seeded at its own concept's CAV (a per-image :class:`ConceptTarget`), so an image
        pays for the concepts it shows, not for every concept of the bank.
        """
        concepts = list(self.bank)
        pairs = [
            (int(b), c)
            for c in concepts
            for b in np.flatnonzero(np.asarray(scores[c].present, dtype=bool))
            if (int(b), c) not in (done or set())
        ]
        if not pairs:
            return {}
        rows = torch.as_tensor([int(b) for b, _ in pairs])
        target = ConceptTarget(self.bank.layer, torch.stack([self._cavs[c] for _, c in pairs]))
        # logits=False: the forward stops at the CAV layer (nothing above it changes the masks)
        heat = _numpy(self.explainer.explain(x[rows], [target], logits=False).heatmaps[0])
        pngs = self._map(lambda i: png_base64(binarize(heat[i]) * 255), range(len(pairs)))
        return {(int(b), c): png for (b, c), png in zip(pairs, pngs, strict=True)}

    def _map(self, fn: Callable[[Any], str], items: Iterable[Any]) -> list[str]:
        """``[fn(i) for i in items]``: the per-image host work (overlays, PNG encoding).

        With LRP on a GPU that work is most of an audit (84 % at batch 32 on an H100, serial,
        benchmarks/results/audit_engine_cuda_h100.md) and the host's cores are otherwise idle, so
        it runs on a thread pool: zlib and numpy release the GIL (32 overlays of the trained
        model, 2 cores: 48.7 ms serial, 37.9 ms on 2 threads). On the CPU it stays in the calling
        thread: there each auditor process already has its core busy with LRP.
        """
        items = list(items)
        if not self.parallel_host or len(items) < 2:
            return [fn(i) for i in items]
        return list(_host_pool().map(fn, items))

    def warmup(self, *, audit: bool = True) -> None:
        """One predict and (``audit``) one audit on a blank image, so the first request pays no
        lazy set-up. An audit's set-up includes the LRP engine's prepacked CPU kernels (~70 MB for
        ResNet-18), worth it only in a process that serves audits."""
        blank = np.zeros((*self.size, 3), dtype=np.uint8)
        self.predict([blank])
        if audit:
            self.audit([blank])


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
#: Most threads of the host pool (:meth:`AuditEngine._map`): PNG encoding stops gaining long before.
HOST_THREADS = 8


def _host_pool() -> ThreadPoolExecutor:
    """The process's one pool for the host work of GPU audits (created on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(min(HOST_THREADS, usable_cpus()), thread_name_prefix="audit-host")
        return _POOL


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A result tensor (on the engine's device) as a float64 array on the host."""
    return t.detach().to("cpu", torch.float64).numpy()


def _channel_relevance(t: torch.Tensor) -> np.ndarray:
    """Relevance at the CAV layer summed over its spatial positions on the engine's device, in
    float64 (as :func:`~medaudit.models.xai.concepts.relevance_share` sums it), then moved: (B, C)
    crosses to the host instead of (B, C, h, w) (ResNet-50 @224 at batch 32: 25 MB less a batch)."""
    t = t.detach()
    if t.ndim == 4:
        t = t.to(torch.float64).sum(dim=(2, 3))
    return _numpy(t)


def compare(
    engines: Mapping[str, AuditEngine],
    image: Image_,
    versions: Sequence[str],
    policy: PolicyConfig | None = None,
) -> Comparison:
    """One image audited by each of ``versions`` (served engines), with the flag ``policy``'s
    decision on each and the versions' label and flag agreement.

    Raises:
        UnknownModelVersionError: a version that is not served (404, lists the served ones).
    """
    if not versions:
        versions = list(engines)
    for v in versions:
        if v not in engines:
            raise UnknownModelVersionError(v, engines)
    results = {v: engines[v].audit([image])[0] for v in dict.fromkeys(versions)}
    return Comparison.decide(results, policy)
