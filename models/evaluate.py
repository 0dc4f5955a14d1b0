"""Evaluation of a model version (method.md §7, §11.14).

* **Classification** on the training-distribution ("ch"), clean and attacked test sets (§5.4):
  accuracy and its binomial standard error, macro F1, per-class one-vs-rest ROC-AUC on raw logits
  and per-class accuracy (accuracy among the samples of that class, as in ``medaudit.models.train``).
* **Artifact relevance** (§7 ``compute_artifact_relevance.py``): input LRP heatmaps of the
  version (its projection, if any, active) seeded at the **true** class with ``init_rel=1``,
  scored by :func:`medaudit.models.xai.localize.artifact_relevance_eval` (|H|, refined mask M′); mean and SEM
  over artifact samples.
* **TCAV** (§7 ``measure_tcav.py``): d_{h,w} = Σ_c ∂f_{c*}/∂a_{c,h,w} · v_c at a fixed layer, with
  v the CAV fitted on the **original** model's activations and c* the class the artifact is
  correlated with; quotient #{d>0}/#{d≠0} over all positions, the same over per-sample spatial
  means, and sensitivity mean |d|, with binomial / SEM standard errors.
* **Retrieval** of the original CAV on the version: AUROC/AP/τ of ⟨φ(x), v⟩ against artifact labels.

Departure, TCAV of P-ClArC: the authors measure TCAV on the model loaded **without** the P-ClArC
hook (§7), so a P-ClArC version's TCAV equals the original's by construction. Here the version is
measured as served: d is the gradient of the served model w.r.t. the original layer output, i.e.
the projection's input when the projection sits at the TCAV layer. The paper's number is the
original model's row. Pass the original model to :func:`tcav` to get it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import ConstantInputWarning
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn

from medaudit.models.corrections.base import capture, pooled_activations
from medaudit.models.errors import ConfigError
from medaudit.models.features import max_pool_spatial
from medaudit.models.registry import ModelCfg, hook_module
from medaudit.models.train import predict, shared_rows
from medaudit.models.xai.localize import artifact_relevance_eval
from medaudit.models.xai.metrics import retrieval_metrics

VARIANTS = ("ch", "clean", "attacked")


# --------------------------------------------------------------------------------- classification


def classification_metrics(
    logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, labels: tuple[str, ...]
) -> dict[str, float]:
    """Accuracy (+ standard error), macro F1 and, per class, AUC, accuracy, one-vs-rest accuracy
    and FPR (method.md §7).

    Per class k: ``auc_k`` is one-vs-rest ROC-AUC on the raw logit of k (NaN when k is absent or
    the only class); ``accuracy_k`` is the accuracy on the images of class k (its recall, what the
    shortcut gap is measured on); ``acc_ovr_k`` is the paper's binary one-vs-rest accuracy, the
    share of all images where "predicted k" equals "is k"; ``fpr_k`` is the share of the other
    classes' images predicted as k (one-hot predictions; NaN when every image is of class k).
    """
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y).astype(np.int64)
    if z.ndim != 2 or z.shape[1] != len(labels) or t.shape != (z.shape[0],) or len(t) == 0:
        raise ConfigError(f"logits must be (N, {len(labels)}) and y (N,), N > 0; got {z.shape} and {t.shape}")
    pred = z.argmax(1)
    acc = float(np.mean(pred == t))
    out = {
        "accuracy": acc,
        "accuracy_se": math.sqrt(acc * (1 - acc) / len(t)),
        "f1_macro": float(
            f1_score(t, pred, labels=list(range(len(labels))), average="macro", zero_division=0)
        ),
        "n": float(len(t)),
    }
    for k, name in enumerate(labels):
        sel = t == k
        out[f"accuracy_{name}"] = float(np.mean(pred[sel] == k)) if sel.any() else float("nan")
        out[f"auc_{name}"] = float(roc_auc_score(sel, z[:, k])) if 0 < sel.sum() < len(t) else float("nan")
        out[f"acc_ovr_{name}"] = float(np.mean((pred == k) == sel))
        out[f"fpr_{name}"] = float(np.mean(pred[~sel] == k)) if (~sel).any() else float("nan")
    return out


# --------------------------------------------------------------------------------- artifact relevance


def input_heatmaps(
    model: nn.Module, cfg: ModelCfg, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 16
) -> np.ndarray:
    """LRP input heatmaps (N, H, W) seeded at the true class with ``init_rel=1`` (method.md §7)."""
    from medaudit.models.xai.lrp import ClassTarget, Explainer

    explainer = Explainer(model, cfg)
    out = []
    for i in range(0, len(images), batch_size):
        x = cfg.normalize(images[i : i + batch_size]).float()
        y = tuple(int(k) for k in labels[i : i + batch_size])
        exp = explainer.explain(x, [ClassTarget(y)], init_rel=1.0)
        out.append(exp.heatmaps[0].double().numpy())
    return np.concatenate(out) if out else np.zeros((0, *images.shape[2:]))


@dataclass(frozen=True)
class MeanSem:
    mean: float
    sem: float
    n: int


def mean_sem(values: np.ndarray) -> MeanSem:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return MeanSem(float("nan"), float("nan"), 0)
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return MeanSem(float(v.mean()), sem, int(v.size))


def artifact_relevance(
    model: nn.Module, cfg: ModelCfg, images: torch.Tensor, labels: torch.Tensor, masks: np.ndarray
) -> MeanSem:
    """Mean and SEM of Σ|H ⊙ M′| / (Σ|H| + 1e-10) over artifact samples (method.md §7)."""
    hm = input_heatmaps(model, cfg, images, labels)
    m = np.asarray(masks)
    if m.shape != hm.shape:
        raise ConfigError(f"masks must be (N, H, W) = {hm.shape}; got {m.shape}")
    return mean_sem(np.array([artifact_relevance_eval(h, k) for h, k in zip(hm, m, strict=True)]))


# --------------------------------------------------------------------------------- TCAV


@dataclass(frozen=True)
class Tcav:
    """TCAV scores of one class at one layer (method.md §7, ``measure_tcav.py``)."""

    quotient: float
    quotient_se: float
    mean_quotient: float
    mean_quotient_se: float
    sensitivity: float
    sensitivity_se: float
    n: int
    target_class: int


def directional_derivatives(
    model: nn.Module,
    cfg: ModelCfg,
    layer: str,
    v: np.ndarray,
    images: torch.Tensor,
    target_class: int,
    batch_size: int = 16,
) -> np.ndarray:
    """d_{b,h,w} = Σ_c ∂f_{c*}(x_b)/∂a_{c,h,w} · v_c, shape (N, H·W) (1 position for (B, C) layers).

    The model runs in eval mode, so samples are independent and a batch gives the per-sample
    gradients of the summed logit.
    """
    model.eval()
    vec = torch.as_tensor(np.asarray(v, np.float32))
    out = []
    with capture(model, cfg, layer, before_correction=True) as store:
        for i in range(0, len(images), batch_size):
            x = cfg.normalize(images[i : i + batch_size]).float().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                (grad,) = torch.autograd.grad(logits[:, target_class].sum(), store["a"])
            g = grad if grad.ndim > 2 else grad[..., None]
            out.append(torch.einsum("bc...,c->b...", g, vec.to(g.dtype)).flatten(1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1))


def tcav(
    model: nn.Module, cfg: ModelCfg, layer: str, v: np.ndarray, images: torch.Tensor, target_class: int
) -> Tcav:
    """TCAV quotient, mean quotient and sensitivity with standard errors (method.md §7)."""
    d = directional_derivatives(model, cfg, layer, v, images, target_class)

    def quotient(x: np.ndarray) -> tuple[float, float]:
        nz = x[x != 0]
        if nz.size == 0:
            return float("nan"), float("nan")
        q = float(np.mean(nz > 0))
        return q, math.sqrt(q * (1 - q) / nz.size)

    q, q_se = quotient(d.ravel())
    mq, mq_se = quotient(d.mean(axis=1)) if len(d) else (float("nan"), float("nan"))
    sens = mean_sem(np.abs(d).ravel())
    return Tcav(q, q_se, mq, mq_se, sens.mean, sens.sem, len(d), target_class)


# --------------------------------------------------------------------------------- the report


@dataclass(frozen=True, eq=False)
class EvalSet:
    """One test variant: uint8 images (N, 3, H, W) and labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True, eq=False)
class EvalData:
    """Everything :func:`evaluate_version` needs, shared by all versions of one model.

    Attributes:
        sets: Test variants by name: "ch", "clean", "attacked" (§5.4).
        artifact: Artifact (concept) name.
        cav_layer: The fixed TCAV / retrieval layer (§7: ResNet ``identity_2``).
        cav: Unit CAV fitted on the **original** model's activations at ``cav_layer``.
        cav_kind: Its kind (§7: ``signal`` for ClArC configs, ``svm`` otherwise), for the card.
        cav_svm: The ``svm`` CAV of the same concept on the original model at ``cav_layer`` (every
            class, §7 ``cav_scope: None``), for the TCAV of versions that are not ClArC; None:
            ``cav`` serves every version.
        tcav_class: c*, the class the artifact is correlated with.
        artifact_images, artifact_labels, artifact_masks: artifact samples (ch variant) with their
            masks (N, H, W), for artifact relevance and TCAV; masks None where the dataset has
            none (artifact relevance is then not measured).
        retrieval_images, retrieval_labels: images and 0/1 artifact labels for retrieval AUROC.
        prefix: Activations at ℓ the first version evaluated recorded, for the later ones
            (:class:`PrefixCache`); filled by :func:`evaluate_version`.
    """

    sets: Mapping[str, EvalSet]
    artifact: str
    cav_layer: str
    cav: np.ndarray
    cav_kind: str
    tcav_class: int
    artifact_images: torch.Tensor
    artifact_labels: torch.Tensor
    artifact_masks: np.ndarray | None
    retrieval_images: torch.Tensor
    retrieval_labels: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)
    cav_svm: np.ndarray | None = None
    prefix: PrefixCache = field(default_factory=lambda: PrefixCache(), repr=False)


@dataclass(frozen=True)
class EvalReport:
    """All metrics of one version; :meth:`as_dict` is what the model card stores."""

    classification: dict[str, dict[str, float]]
    artifact_relevance: MeanSem
    tcav: Tcav
    retrieval: dict[str, float]
    artifact: str
    cav_layer: str
    cav_kind: str

    def as_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so the card is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def retrieval(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Retrieval metrics of bias scores, with float32 round-off removed first.

    After P-ClArC every score is ⟨μ0, v⟩ up to float32 round-off (~1e-7 relative); ranking that
    noise would give a random AUROC instead of the 0.5 of a constant score. Scores are therefore
    rounded to 5 significant digits of their largest magnitude. A constant score has no Kendall τ
    (scipy warns and returns NaN; it is stored as null).
    """
    s = np.asarray(scores, dtype=np.float64)
    scale = float(np.max(np.abs(s))) if s.size else 0.0
    if scale > 0:
        step = 10.0 ** (math.floor(math.log10(scale)) - 4)
        s = np.round(s / step) * step
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConstantInputWarning)
        return {k: float(v) for k, v in retrieval_metrics(s, labels).as_dict().items()}


@torch.no_grad()
def logits_and_pooled(
    model: nn.Module, cfg: ModelCfg, images: torch.Tensor, layer: str, batch_size: int = 128
) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (as :func:`medaudit.models.train.predict`) and φ at ``layer`` (as
    :func:`~models.corrections.base.pooled_activations`) from **one** forward per batch."""
    model.eval()
    dev = next(model.parameters()).device
    logits, acts = [], []
    with capture(model, cfg, layer, before_correction=False) as store:
        for i in range(0, len(images), batch_size):
            logits.append(model(cfg.normalize(images[i : i + batch_size].to(dev))).cpu())
            acts.append(max_pool_spatial(store["a"]).double().cpu())
    return torch.cat(logits), torch.cat(acts).numpy()


def _same_images(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of the same memory with the same layout (hence equal)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def prefix_fingerprint(model: nn.Module, cfg: ModelCfg, layer: str) -> str:
    """sha256 of every parameter and buffer of the modules up to and including ``layer``, ClArC
    projections excluded: two models with equal fingerprints compute the same activation at ℓ
    before any projection (same architecture class assumed: versions of one build)."""
    from medaudit.models.corrections.base import frozen_module_names
    from medaudit.models.corrections.projection import ClarcProjection

    h = hashlib.sha256(type(model).__name__.encode())
    modules = dict(model.named_modules())
    for name in frozen_module_names(model, cfg, layer):
        m = modules[name]
        if isinstance(m, ClarcProjection):
            continue
        h.update(f"|{name}:{type(m).__name__}".encode())
        for key, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            h.update(f"|{key}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(eq=False)
class PrefixCache:
    """The activation maps at ℓ of every test row, recorded by the first version evaluated.

    Every version of one build shares the layers up to and including ℓ: the fine-tuning
    corrections freeze them (method.md §4.1, §11.9) and the ClArC projections act on ℓ's output
    (§4.2). Their activation there, before any projection, is therefore the same for every version,
    and only the layers after ℓ need to run again (a quarter of resnet18's FLOPs at
    ℓ = identity_2; on the demo build it cut the classification forwards of the five later versions
    to about a third). Sharing is checked, not assumed: :func:`prefix_fingerprint` must match, and a
    probe row must give the same logits both ways, or the version is forwarded in full.

    Attributes:
        fingerprint: :func:`prefix_fingerprint` of the model that recorded the maps ("" = none yet).
        layer: ℓ.
        maps: Per test variant, ``(images, maps)``: the variant's images (to check a later call
            passes the very same tensor) and their (N, C, h, w) float32 maps at ℓ.
    """

    fingerprint: str = ""
    layer: str = ""
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@contextlib.contextmanager
def _resume_at(model: nn.Module, cfg: ModelCfg, layer: str, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, the activation at ``layer`` (before a ClArC projection there, as
    :func:`~models.corrections.base.capture` with ``before_correction``) is replaced by
    ``store["a"]``: a forward on an **empty** batch then costs nothing before ℓ and runs the layers
    after ℓ on the stored maps."""
    from medaudit.models.corrections.projection import ClarcProjection

    module = hook_module(model, cfg, layer)
    last = list(module.children())[-1] if isinstance(module, nn.Sequential) and len(module) else None
    if isinstance(last, ClarcProjection):
        handle = last.register_forward_pre_hook(lambda _m, _args: (store["a"],))
    else:
        handle = module.register_forward_hook(lambda _m, _args, _out: store["a"])
    try:
        yield
    finally:
        handle.remove()


class _Forwards:
    """The classification forwards of one evaluation: replayed from ℓ, recorded, or plain."""

    def __init__(self, model: nn.Module, cfg: ModelCfg, data: EvalData, batch_size: int = 128) -> None:
        self.model, self.cfg, self.layer, self.bs = model, cfg, data.cav_layer, batch_size
        self.cache = data.prefix
        fp = prefix_fingerprint(model, cfg, self.layer)
        if self.cache.fingerprint == fp and self.cache.layer == self.layer and self._probe():
            self.mode = "replay"
        elif not self.cache.fingerprint:
            self.mode, self.cache.fingerprint, self.cache.layer = "record", fp, self.layer
        else:
            self.mode = "plain"
        self.done: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    @torch.no_grad()
    def _suffix(self, maps: torch.Tensor, pooled: bool) -> tuple[torch.Tensor, np.ndarray | None]:
        self.model.eval()
        empty = torch.zeros(0, *self.cfg.input_size)
        store: dict[str, torch.Tensor] = {}
        logits, acts = [], []
        # the injecting hook first: capture's hook on the same module must see the stored maps
        with (
            _resume_at(self.model, self.cfg, self.layer, store),
            capture(self.model, self.cfg, self.layer, before_correction=False) as cap,
        ):
            for i in range(0, len(maps), self.bs):
                store["a"] = maps[i : i + self.bs]
                logits.append(self.model(empty))
                if pooled:
                    acts.append(max_pool_spatial(cap["a"]).double())
        return torch.cat(logits), torch.cat(acts).numpy() if pooled else None

    def _probe(self) -> bool:
        """Whether replaying the first cached row gives the logits of a full forward."""
        if not self.cache.maps:
            return False
        images, maps = next(iter(self.cache.maps.values()))
        full = predict(self.model, images[:2], self.cfg)
        return bool(torch.allclose(self._suffix(maps[:2], False)[0], full, rtol=1e-4, atol=1e-5))

    @torch.no_grad()
    def _full(
        self, images: torch.Tensor, pooled: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray | None]:
        self.model.eval()
        record = self.mode == "record"
        logits, maps, acts = [], [], []
        with (
            capture(self.model, self.cfg, self.layer, before_correction=True) as pre,
            capture(self.model, self.cfg, self.layer, before_correction=False) as post,
        ):
            for i in range(0, len(images), self.bs):
                logits.append(self.model(self.cfg.normalize(images[i : i + self.bs])))
                if record:
                    maps.append(pre["a"].clone())
                if pooled:
                    acts.append(max_pool_spatial(post["a"]).double())
        return (
            torch.cat(logits),
            torch.cat(maps) if record else None,
            torch.cat(acts).numpy() if pooled else None,
        )

    def __call__(
        self, name: str, images: torch.Tensor, pooled: bool
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Logits of a test variant's images and, with ``pooled``, φ at ℓ (after any projection)."""
        hit = self.cache.maps.get(name)
        if self.mode == "replay" and hit is not None and _same_images(hit[0], images):
            return self._suffix(hit[1], pooled)
        src = shared_rows(images, [d[0] for d in self.done]) if not pooled else None
        if src is None or not (src >= 0).any():
            logits, maps, acts = self._full(images, pooled)
        else:  # rows an earlier variant shares are not forwarded again
            todo = src < 0
            logits = torch.empty(len(images), self.done[0][1].shape[1])
            maps = None
            if self.mode == "record":
                m0 = self.done[0][2]
                assert m0 is not None
                maps = torch.empty(len(images), *m0.shape[1:])
            for j, (_, prev_logits, prev_maps) in enumerate(self.done):
                same = src == j
                logits[same] = prev_logits[same]
                if maps is not None and prev_maps is not None:
                    maps[same] = prev_maps[same]
            acts = None
            if todo.any():
                new_logits, new_maps, _ = self._full(images[todo], False)
                logits[todo] = new_logits
                if maps is not None and new_maps is not None:
                    maps[todo] = new_maps
        self.done.append((images, logits, maps))
        if self.mode == "record" and maps is not None:
            self.cache.maps[name] = (images, maps)
        return logits, acts


def evaluate_version(
    model: nn.Module, cfg: ModelCfg, data: EvalData, tcav_kind: str | None = None
) -> EvalReport:
    """Every §7 metric of one version (the model as served: projections active).

    TCAV uses the CAV of ``tcav_kind`` (§7: ``signal`` for the ClArC versions, ``svm`` for
    Vanilla and RRR): ``data.cav_svm`` for ``svm`` when there is one, else ``data.cav``; retrieval
    always scores with ``data.cav``.

    Classification forwards (:class:`_Forwards`): the first version evaluated records every test
    row's activation at ℓ in ``data.prefix``; a later version whose layers up to ℓ are the same
    (:class:`PrefixCache`) runs only the layers after ℓ. Rows a later variant shares byte for byte
    with an earlier one are not forwarded again (:func:`medaudit.models.train.shared_rows`). When the
    retrieval images
    are one of the test variants (synthderm: the "ch" split), their activations at ℓ come from
    that variant's classification forward instead of a second pass over the same images.
    """
    cls: dict[str, dict[str, float]] = {}
    acts: np.ndarray | None = None
    forwards = _Forwards(model, cfg, data)
    for name, s in data.sets.items():
        if len(s.labels) == 0:
            continue
        want = acts is None and _same_images(s.images, data.retrieval_images)
        logits, pooled = forwards(name, s.images, want)
        if want:
            acts = pooled
        cls[name] = classification_metrics(logits, s.labels, cfg.labels)
    if data.artifact_masks is None:
        rel = mean_sem(np.zeros(0))
    else:
        rel = artifact_relevance(model, cfg, data.artifact_images, data.artifact_labels, data.artifact_masks)
    use_svm = tcav_kind == "svm" and data.cav_svm is not None
    tcav_cav = data.cav_svm if use_svm and data.cav_svm is not None else data.cav
    tc = tcav(model, cfg, data.cav_layer, tcav_cav, data.artifact_images, data.tcav_class)
    ret: dict[str, float] = {}
    if len(np.unique(data.retrieval_labels)) == 2:  # retrieval needs images with and without it
        if acts is None:
            acts = pooled_activations(model, cfg, data.cav_layer, data.retrieval_images)
        ret = retrieval(acts @ np.asarray(data.cav, np.float64), data.retrieval_labels)
    return EvalReport(
        classification=cls,
        artifact_relevance=rel,
        tcav=tc,
        retrieval=ret,
        artifact=data.artifact,
        cav_layer=data.cav_layer,
        cav_kind="svm" if use_svm else data.cav_kind,
    )


# --------------------------------------------------------------------------------- synthderm


def synthderm_eval_data(
    ds: Any,
    cfg: ModelCfg,
    *,
    artifact: str,
    cav: np.ndarray,
    cav_layer: str,
    cav_kind: str,
    split: str = "test",
    max_artifact_samples: int = 64,
    tcav_class: int | None = None,
    cache_dir: Any = None,
) -> EvalData:
    """:class:`EvalData` for a :class:`~models.data.synthetic.SynthDerm` split.

    Test variants via :func:`medaudit.models.train.render_split` (attacked: ``artifact`` on every image);
    artifact samples are the split's training-distribution images carrying ``artifact`` (at most
    ``max_artifact_samples``, in index order) with their exact pixel masks; retrieval runs on the
    whole "ch" split. ``tcav_class`` defaults to the class with the higher artifact rate in the spec.
    """
    from medaudit.models.train import render_split

    sets = {v: EvalSet(*render_split(ds, split, v, artifact, cache_dir=cache_dir)) for v in VARIANTS}
    idx = ds.indices(split)
    member = ds.membership[artifact][idx]
    chosen = idx[member][:max_artifact_samples]
    if len(chosen) == 0:
        raise ConfigError(f"split {split!r} has no {artifact!r} samples to evaluate artifact relevance on")
    samples = [ds.sample(int(i), "ch", artifact) for i in chosen]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    masks = np.stack([s.masks[artifact].astype(np.float32) for s in samples])
    if tcav_class is None:
        rates = ds.cfg.spec.get(artifact, (0.0, 0.0))
        tcav_class = int(np.argmax(rates))
    return EvalData(
        sets=sets,
        artifact=artifact,
        cav_layer=cav_layer,
        cav=np.asarray(cav, np.float64),
        cav_kind=cav_kind,
        tcav_class=tcav_class,
        artifact_images=images,
        artifact_labels=torch.tensor([s.label for s in samples]),
        artifact_masks=masks,
        retrieval_images=sets["ch"].images,
        retrieval_labels=member.astype(np.int64),
        info={
            "split": split,
            "n_artifact_samples": len(chosen),
            "dataset": "synthderm",
            "data_config": ds.cfg.to_dict(),
        },
    )
