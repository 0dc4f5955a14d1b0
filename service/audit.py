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
  binarisation (§2.2) is the localization mask of a concept judged present. It runs in two
  stages (:mod:`medaudit.service.audit_stages`): :meth:`AuditEngine.audit_raw` on the engine's
  device (LRP, scores, the overlay blend, one host copy) and :meth:`AuditEngine.finish` on the host
  (masks, PNGs), which a caller may overlap with the next batch's first stage.
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
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medaudit.models.export import INPUT_NAME, OUTPUT_NAME, ort_session
from medaudit.models.xai.localize import concept_mask, family_mask_pooling
from medaudit.models.xai.lrp import ConceptTarget, Explainer
from medaudit.models.xai.validation import heatmap_refusal
from medaudit.service.audit_graphs import (
    FixedShapeScreen,
    GraphChoice,
    ScreenOut,
    channel_sum,
    choose,
    plain_screen,
)

# the host encodings are audit_stages'; re-exported where callers have always imported them
from medaudit.service.audit_stages import DeviceScorer, HostScores, RawAudit, overlay_pixels
from medaudit.service.audit_stages import heat_layer as heat_layer
from medaudit.service.audit_stages import overlay as overlay
from medaudit.service.audit_stages import png_base64 as png_base64

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
        #: Score concepts on the engine's device (:class:`DeviceScorer`; one host copy a batch and no
        #: host sync between the forward and the backward) where that device is not the host; on the
        #: CPU the bank's own numpy scoring, whose results the device scores are tested against.
        self.device_scoring = self.device.type != "cpu"
        self._scorer: DeviceScorer | None = None
        #: The screen's LRP call: plain, or at fixed batch sizes (:meth:`use_screen_graphs`).
        self._screen: Callable[[torch.Tensor], ScreenOut] = partial(
            plain_screen, self.explainer, self.bank.layer
        )
        self.graphs = GraphChoice(False, "CUDA graphs not asked for")

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

    @property
    def scorer(self) -> DeviceScorer:
        """The bank's scoring on the engine's device, at the engine's current presence FPR."""
        if self._scorer is None or self._scorer.fpr != self.fpr:
            self._scorer = DeviceScorer(self.bank, self.fpr, self.device)
        return self._scorer

    def _inputs(self, images: Sequence[Image_]) -> tuple[np.ndarray, torch.Tensor]:
        rgb = self.predictor.pixels(images)  # (B, H, W, 3) uint8
        return rgb, self.cfg.normalize(torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous())

    def predict(self, images: Sequence[Image_]) -> list[Prediction]:
        """Predictions for a batch of images, one ONNX Runtime run."""
        return self.predictor.predict(images)

    def use_screen_graphs(self, buckets: Sequence[int], *, pad_only: bool = False) -> GraphChoice:
        """Screens at the fixed batch sizes ``buckets``, replayed as CUDA graphs where the engine is
        on CUDA (:mod:`medaudit.service.audit_graphs`); elsewhere the plain path, the reason kept in
        :attr:`graphs`. ``pad_only``: the cut-and-pad path without capture, on any device."""
        choice = choose(self.device, True, buckets)
        layer = self.bank.layer
        if choice.graphed or pad_only:
            sizes = choice.buckets or tuple(buckets)
            self._screen = FixedShapeScreen(self.explainer, layer, sizes, capture=choice.graphed)
        else:
            self._screen = partial(plain_screen, self.explainer, layer)
        self.graphs = choice
        return choice

    def audit(
        self, images: Sequence[Image_], *, raw_heatmap: bool = False, overlays: bool = True
    ) -> list[AuditResult]:
        """Full audits for a batch of images: :meth:`audit_raw`, then :meth:`finish`.

        ``overlays=False`` skips the heatmap overlay PNGs (``heatmap_png`` ``None``): host work for
        callers that keep the raw heatmap instead (``medaudit scan --heatmaps``).
        """
        return self.finish(self.audit_raw(images, raw_heatmap=raw_heatmap, overlays=overlays))

    def audit_raw(
        self, images: Sequence[Image_], *, raw_heatmap: bool = False, overlays: bool = True
    ) -> RawAudit:
        """An audit's critical path: the LRP calls, the scores, the overlay blend, arrays to the host.

        One LRP call (one forward, one batched backward) gives the class heatmap, the pooled
        activations that score every concept, the class relevance at the CAV layer for the
        shares, and, through a second seed chosen between the forward and the backward, each
        image's mask for the first concept present on it (a ``ConceptTarget`` whose vector is
        a function of the forward: no second forward). On clean traffic that seed is zero and
        is skipped, so the audit costs one backward. Only images showing two or more concepts
        need one more call, for their other concepts' masks. The overlays are blended where the
        heatmaps are (:func:`~medaudit.service.audit_stages.overlay_pixels`) and cross as uint8;
        masks and PNGs are :meth:`finish`'s.
        """
        rgb, x = self._inputs(images)
        layer = self.bank.layer
        chosen: dict[str, Any] = {}

        def first_present(pooled: torch.Tensor) -> torch.Tensor:
            if self.device_scoring:  # no host sync between the forward and the backward
                chosen["scores"] = s = self.scorer.score(pooled)
                return self._seed_rows[s.pick]  # -1: the zero row
            scores = self.bank.score(pooled.double().cpu().numpy(), self.fpr)
            present = np.stack([np.asarray(scores[c].present, dtype=bool) for c in self._names])  # (K, B)
            pick = np.where(present.any(0), present.argmax(0), -1)
            return self._seed_rows[torch.as_tensor(pick, device=self.device)]

        e = self.explainer.explain(
            x, ["pred", ConceptTarget(layer, first_present)], cav_layers=[layer], relevance_layers=[layer]
        )
        class_rel = channel_sum(e.relevance[layer][0])  # (B, C), seeded at the class
        preds, scores, pooled = self._score(e.logits, e.activations[layer], class_rel, chosen.get("scores"))
        withheld = self.heatmap_note is not None  # never shown blank or wrong: no heatmap, no masks
        # host copies only of what is asked for: overlays (uint8) and raw heatmaps (float16) of the
        # class heatmap, the concept-seeded heatmap of the images that show a concept
        heat = e.heatmaps[0] if not withheld and (overlays or raw_heatmap) else None  # (B, H, W)
        raw = RawAudit(preds, scores, pooled, rgb)
        if heat is not None and overlays:
            raw.overlays = overlay_pixels(torch.from_numpy(rgb).to(heat.device), heat).cpu().numpy()
        if heat is not None and raw_heatmap:
            raw.heatmaps = heat.detach().to(torch.float16).cpu().numpy()
        if not withheld:
            first = [(b, self._names[k]) for b, k in enumerate(scores.pick) if k >= 0]
            if first:  # each image's first present concept, seeded in the call above
                seeded = _numpy(
                    e.heatmaps[1][torch.as_tensor([b for b, _ in first], device=e.heatmaps.device)]
                )
                raw.concept_heat = dict(zip(first, seeded, strict=True))
            raw.concept_heat = {**raw.concept_heat, **self._mask_heat(x, scores, done=set(raw.concept_heat))}
        return raw

    def finish(self, raw: RawAudit) -> list[AuditResult]:
        """An audit's host stage: masks binarised (method.md §2.2) and every PNG encoded."""
        keys = list(raw.concept_heat)
        pooling = family_mask_pooling(self.cfg.canonizer)  # superpixels for a ViT, method.md §2.4

        def mask_png(key: tuple[int, str]) -> str:
            return png_base64(concept_mask(raw.concept_heat[key], raw.rgb[key[0]], pooling) * 255)

        pngs_masks = self._map(mask_png, keys)
        masks = dict(zip(keys, pngs_masks, strict=True))
        n = len(raw.predictions)
        ov = raw.overlays
        pngs: list[str | None] = (
            [None] * n if ov is None else list(self._map(lambda b: png_base64(ov[b]), range(n)))
        )
        return [
            AuditResult(
                prediction=pred,
                heatmap_png=pngs[b],
                concepts=self._concepts(raw.scores, b, masks),
                layer=self.bank.layer,
                heatmap=None if raw.heatmaps is None else raw.heatmaps[b],
                features=raw.pooled[b].astype(np.float32),
                heatmap_note=self.heatmap_note,
                image=raw.rgb[b],
            )
            for b, pred in enumerate(raw.predictions)
        ]

    def screen(self, images: Sequence[Image_]) -> list[AuditResult]:
        """What :meth:`audit` gives the flag policy, without heatmaps or masks, for a batch of images.

        The prediction, each concept's score, percentile and presence (method.md §1.4) and its
        relevance share come from one LRP call whose backward stops at the CAV layer ℓ
        (``Explainer.explain(heatmaps=False)``): the class relevance at ℓ depends only on the
        layers above it (ResNet-18 at ``identity_2``: the last of four stages), and the forward
        up to ℓ records no autograd graph. The same forward, the same relevance at ℓ and the same
        scoring as :meth:`audit`, so the same scores, presence, shares and flag decision on the
        same batch (tests/unit/test_screening.py). ``heatmap_png`` is ``None``, masks too. At fixed
        batch sizes the call may be a CUDA-graph replay (:meth:`use_screen_graphs`).
        """
        _, x = self._inputs(images)
        out = self._screen(x)
        preds, scores, pooled = self._score(out.logits, out.pooled, out.class_rel)
        return [
            AuditResult(
                prediction=pred,
                heatmap_png=None,
                concepts=self._concepts(scores, b, {}),
                layer=self.bank.layer,
                features=pooled[b].astype(np.float32),
            )
            for b, pred in enumerate(preds)
        ]

    def _score(
        self, logits: torch.Tensor, pooled: torch.Tensor, class_rel: torch.Tensor, scored: Any = None
    ) -> tuple[list[Prediction], HostScores, np.ndarray]:
        """Predictions, concept scores with relevance shares, and φ(x) on the host (float64).

        On the device (:attr:`device_scoring`) everything crosses in one copy (``scored``: the
        scores already computed between the forward and the backward); on the CPU with the bank's
        numpy scoring."""
        if self.device_scoring:
            s = scored if scored is not None else self.scorer.score(pooled)
            scores, (z, phi) = self.scorer.to_host(s, class_rel, logits, pooled)
        else:
            z, phi = _numpy(logits), _numpy(pooled)
            scores = HostScores.from_bank(self.bank, phi, _numpy(class_rel), self.fpr)
        return predictions(z, self.cfg.labels, self.version), scores, phi

    def _concepts(
        self, scores: HostScores, b: int, masks: Mapping[tuple[int, str], str]
    ) -> tuple[ConceptScore, ...]:
        """Image ``b``'s score of every concept of the bank, in bank order (audits and screens)."""
        return tuple(
            ConceptScore(
                concept=c,
                score=float(scores.score[b, k]),
                percentile=float(scores.percentile[b, k]),
                present=bool(scores.present[b, k]),
                threshold=float(scores.threshold[k]),
                relevance_share=float(scores.share[b, k]),
                mask_png=masks.get((b, c)),
            )
            for k, c in enumerate(scores.names)
        )

    def _mask_heat(
        self, x: torch.Tensor, scores: HostScores, done: set[tuple[int, str]] | None = None
    ) -> dict[tuple[int, str], np.ndarray]:
        """Concept-conditioned heatmaps (method.md §2.1) of the present concepts, for their masks:
        ``(image, concept) -> (H, W)`` float64.

        One LRP call over the (image, concept) pairs that are present (less those in ``done``),
        each seeded at its own concept's CAV (a per-image :class:`ConceptTarget`), so an image
        pays for the concepts it shows, not for every concept of the bank.
        """
        pairs = [
            (int(b), c)
            for k, c in enumerate(scores.names)
            for b in np.flatnonzero(scores.present[:, k])
            if (int(b), c) not in (done or set())
        ]
        if not pairs:
            return {}
        rows = torch.as_tensor([int(b) for b, _ in pairs])
        target = ConceptTarget(self.bank.layer, torch.stack([self._cavs[c] for _, c in pairs]))
        # logits=False: the forward stops at the CAV layer (nothing above it changes the masks)
        heat = _numpy(self.explainer.explain(x[rows], [target], logits=False).heatmaps[0])
        return {pair: heat[i] for i, pair in enumerate(pairs)}

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
    return _numpy(channel_sum(t))


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
