"""The offline build (architecture.md): data → train → CAVs → corrections → evaluate → export → store.

:func:`build` runs the whole demo pipeline for one artifact:

1. **data + train**: :func:`medaudit.models.train.train` on the synthderm config (resumable; a finished run
   only re-reads its card). The checkpoint is ``<out>/<arch>-synthderm/model.pt``, the same place
   ``medaudit train`` writes by default. With a **model spec** (``BuildConfig.model``: a
   classifier medaudit did not train, :mod:`medaudit.models.spec`) nothing is trained: the spec's
   checkpoint is the original, the data is rendered at its input size, and everything lands in
   ``<out>/<spec name>``, registered as ``<spec name>:<version>``.
2. **concept banks** at the correction layer ℓ, from the **original** model's max-pooled
   activations on the training split (method.md §1.1, §11.7): a ``signal`` bank for the correction
   artifact within ``cav_scope`` (the correction CAV v and μ0, §1.3) plus the SVM gate of
   reactive P-ClArC fitted on the same samples (§4.3), and an ``svm`` bank of every artifact drawn
   in the training split, calibrated on clean validation images, for detection (§1.3).
3. **corrections**: every name in ``BuildConfig.corrections`` through
   :func:`medaudit.models.build.correct_and_evaluate` (correct → save → ONNX export → parity →
   §7 evaluation → card). Fine-tuning corrections train on a seeded subset of the training split.
4. **register** (optional callback, so that ``models`` never imports the store; the CLI passes
   :func:`medaudit.service.store.register_version`) and the **comparison table** (Markdown + JSON), with the
   acceptance columns (:func:`acceptance`).

Every stage is keyed by a hash of its inputs (base weights sha256, configs, stage format) and its
outputs are reused while the key matches and the files are intact (sha256 of weights and ONNX
checked against the card), so re-running the build only redoes what changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medaudit.models.cards import CARD_JSON, ModelCard, comparison_markdown, comparison_rows
from medaudit.models.corrections import CORRECTIONS, Correction, CorrectionData, FinetuneConfig
from medaudit.models.corrections.base import pooled_activations
from medaudit.models.data.synthetic import SynthDerm
from medaudit.models.errors import ConfigError
from medaudit.models.evaluate import EvalData, EvalSet
from medaudit.models.spec import ModelSpec
from medaudit.models.train import (
    Progress,
    TrainConfig,
    render_split,
    render_splits,
    reusing,
    sha256_file,
    train,
)
from medaudit.models.xai.concepts import ConceptBank, fit_cav

#: Bump when a stage's outputs change meaning, so old outputs are not reused.
PIPELINE_VERSION = 2  # 2: fine-tunes resume the base run's optimiser state, not the previous one's
DEFAULT_CORRECTIONS = ("vanilla", "vanilla-ft", "pclarc", "rpclarc", "rrclarc", "rrr")

#: ``register(name, version, weights, onnx, card_dir, bank_dir) -> (tag, created)``.
Register = Callable[..., tuple[str, bool]]


@dataclass(frozen=True)
class BuildConfig:
    """What the demo build makes. Data and training default to the dataclass defaults of
    :class:`~models.train.TrainConfig` / :class:`~models.data.synthetic.SynthDermConfig`.

    Attributes:
        train: Base training (and data) config.
        artifact: The artifact to correct for (a synthderm artifact with a nonzero rate).
        layer: CAV / correction layer ℓ; "" = the architecture's ``default_cav_layer``.
        cav_scope: ``"artifact_class"``: fit the correction CAV and μ0 on the samples of the class
            the artifact is correlated with (the paper's controlled setting, method.md §1.1);
            ``"all"``: on every training sample.
        corrections: Versions to build, by correction name (``medaudit.models.corrections.CORRECTIONS``).
        finetune: Schedule for the fine-tuning corrections; None = each correction's default.
        n_correction_images: Size of the seeded training subset the fine-tuning corrections see;
            0 = the whole training split.
        n_eval_images: Test images per variant (ch, clean, attacked; the same indices in each)
            and for retrieval; 0 = the whole test split. The split's labels are drawn i.i.d., so
            its first n images are a random sample.
        max_artifact_samples: Artifact samples for relevance and TCAV (method.md §7).
        opset: ONNX opset.
        seed: Seed of the subset draw and the CAV fits.
        target_fpr: Detection bank presence threshold's false-positive rate.
        threads: torch threads for the whole build (0: torch's default). Not part of any stage key,
            and kept apart from ``train.threads``, which is part of the training config a
            checkpoint is resumed under. On a shared machine 1 thread can be several times faster
            than 2 (OpenMP threads spinning against other processes' threads).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    artifact: str = "band_aid"
    layer: str = ""
    cav_scope: str = "artifact_class"
    #: ``"paired"``: fit the correction CAV, μ0 and the rP-ClArC gate on counterfactual pairs, every
    #: training image rendered without and with the artifact (synthderm can draw both), so v is
    #: the artifact's direction alone. ``"membership"``: the paper's recipe, artifact vs
    #: no-artifact samples within ``cav_scope`` (method.md §1.1). Membership CAVs pick up whatever
    #: the artifact co-occurs with: with band-aids on biopsied (ambiguous-looking) benign lesions,
    #: v also points along "malignant-looking", and P-ClArC then moved malignant images toward
    #: benign (measured: attacked malignant accuracy 0.664 -> 0.320).
    cav_data: str = "paired"
    corrections: tuple[str, ...] = DEFAULT_CORRECTIONS
    finetune: FinetuneConfig | None = None
    n_correction_images: int = 800
    n_eval_images: int = 0
    max_artifact_samples: int = 64
    opset: int = 17
    seed: int = 0
    target_fpr: float = 0.05
    threads: int = 0
    #: A classifier medaudit did not train (its spec); None: train ``train.arch`` on the data.
    model: ModelSpec | None = None

    def __post_init__(self) -> None:
        if self.model is not None:
            if len(self.model.labels) != 2:
                raise ConfigError(
                    f"{self.model.path}: the model has {len(self.model.labels)} classes but the synthderm "
                    "data has 2 (benign, malignant, in that order)"
                )
            side = self.model.input_size[-1]
            if self.model.input_size[1] != side or self.train.data.size != side:
                raise ConfigError(
                    f"the data is rendered at {self.train.data.size} px but {self.model.path} takes "
                    f"{list(self.model.input_size)}: build with data of size {side} (square inputs only)"
                )
        unknown = [c for c in self.corrections if c not in CORRECTIONS]
        if unknown:
            raise ConfigError(f"unknown corrections {unknown}; valid: {', '.join(CORRECTIONS)}")
        if self.cav_scope not in ("artifact_class", "all"):
            raise ConfigError(f"cav_scope={self.cav_scope!r}; valid: 'artifact_class', 'all'")
        if self.cav_data not in ("paired", "membership"):
            raise ConfigError(f"cav_data={self.cav_data!r}; valid: 'paired', 'membership'")
        rates = self.train.data.spec.get(self.artifact)
        if rates is None or max(rates) <= 0:
            drawn = [a for a, r in self.train.data.spec.items() if max(r) > 0]
            raise ConfigError(
                f"artifact {self.artifact!r} is not drawn in the data; drawn: {', '.join(drawn)}"
            )
        if self.n_correction_images < 0 or self.n_eval_images < 0 or self.max_artifact_samples < 1:
            raise ConfigError(
                "n_correction_images and n_eval_images must be ≥ 0 and max_artifact_samples ≥ 1; got "
                f"{self.n_correction_images}, {self.n_eval_images}, {self.max_artifact_samples}"
            )

    @property
    def model_name(self) -> str:
        """Versions are registered as ``<model_name>:<version>``: the spec's name, else
        ``<arch>-synthderm`` for the model medaudit trains."""
        return self.model.name if self.model is not None else f"{self.train.arch}-synthderm"

    def correction(self, name: str) -> Correction:
        cls = CORRECTIONS[name]
        if self.finetune is not None and "finetune" in getattr(cls, "__dataclass_fields__", {}):
            return cls(finetune=self.finetune)
        return cls()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        d["finetune"] = None if self.finetune is None else self.finetune.to_dict()
        d["model"] = None if self.model is None else str(self.model.path)
        return d


@dataclass(frozen=True)
class StageRun:
    """One stage's outcome: its key, whether the output was reused, and its wall time."""

    stage: str
    key: str
    reused: bool
    seconds: float


@dataclass(frozen=True, eq=False)
class BuildResult:
    """What :func:`build` produced.

    Attributes:
        model_dir: ``<out>/<arch>-synthderm``: base checkpoint, caches, banks, versions.
        cards: One card per version, in ``BuildConfig.corrections`` order.
        version_dirs: ``{version: directory with model.pt, model.onnx, card.*, bank/}``.
        registered: ``{version: (tag, created)}`` when a register callback was given.
        comparison: The comparison rows (with the acceptance columns).
        comparison_md, comparison_json: Where the table was written.
        stages: Per-stage key, reuse flag and seconds.
        seconds: Total wall time.
    """

    model_dir: Path
    cards: tuple[ModelCard, ...]
    version_dirs: Mapping[str, Path]
    registered: Mapping[str, tuple[str, bool]]
    comparison: tuple[dict[str, Any], ...]
    comparison_md: Path
    comparison_json: Path
    stages: tuple[StageRun, ...]
    seconds: float

    @property
    def accepted(self) -> list[str]:
        """Versions meeting the correction acceptance criteria (see :func:`acceptance`)."""
        return [r["version"] for r in self.comparison if r.get("meets criteria")]


def stage_key(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts."""
    blob = json.dumps([PIPELINE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------- the build


def build(
    cfg: BuildConfig,
    out_dir: str | Path,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
    *,
    register: Register | None = None,
) -> BuildResult:
    """Builds (or reuses) every stage of the demo for ``cfg``; see the module docstring.

    Args:
        cfg: The build config.
        out_dir: Root folder; the model family goes to ``<out_dir>/<arch>-synthderm``.
        progress: ``progress(description, total) -> advance(n)``, one bar per long step.
        log: Line logger.
        register: Called once per version with ``(name, version, weights=, onnx=, card_dir=,
            bank_dir=)``; returns ``(tag, created)``. None: nothing is registered.
    """
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stages: list[StageRun] = []
    model_dir = Path(out_dir) / cfg.model_name
    cache = model_dir / "cache"

    # 1. data + train (models.train.train is itself resumable and idempotent), or the spec's model
    t0 = time.perf_counter()
    if cfg.model is not None:
        from medaudit.models.spec import build as build_spec

        model, mcfg, weights_sha = build_spec(cfg.model)
        stages.append(StageRun("model", weights_sha[:16], True, _since(t0)))
        spec = cfg.model
        log(f"model: {spec.source} {spec.arch} from {spec.checkpoint} (sha256 {weights_sha[:12]}…)")
    else:
        ckpt = model_dir / "model.pt"
        before = _file_state(ckpt)
        train(cfg.train, model_dir, cache_dir=cache, progress=progress, log=log)
        weights_sha = sha256_file(ckpt)
        reused = before is not None and before == _file_state(ckpt)
        stages.append(StageRun("train", weights_sha[:16], reused, _since(t0)))
        log(f"train: {'reused' if reused else 'trained'} {ckpt} (sha256 {weights_sha[:12]}…)")

        from medaudit.models.corrections.io import load_version

        model, mcfg, _ = load_version(ckpt)
    layer = cfg.layer or mcfg.default_cav_layer
    ds = SynthDerm(cfg.train.data)
    Xtr, ytr = render_split(ds, "train", cache_dir=cache, progress=progress)
    tr_idx = ds.indices("train")
    base_tag = f"{cfg.model_name}:vanilla"

    # 2. concept banks on the original model
    t0 = time.perf_counter()
    concepts = [a for a in ds.membership if ds.membership[a][tr_idx].any()]
    focus = int(np.argmax(cfg.train.data.spec[cfg.artifact]))
    scope = (focus,) if cfg.cav_scope == "artifact_class" else None
    bank_key = stage_key(
        "banks", weights_sha, cfg.train.data.to_dict(), layer, cfg.artifact, scope, concepts, cfg.seed,
        cfg.target_fpr, cfg.cav_data,
    )  # fmt: skip
    bank_dir = model_dir / "banks" / bank_key
    banks = _load_banks(bank_dir)
    if banks is None:
        banks = _fit_banks(
            model, mcfg, ds, layer, Xtr, ytr, concepts, cfg, scope, base_tag, cache, progress, log
        )
        _save_banks(banks, bank_dir, {"key": bank_key, "layer": layer, "scope": scope, "concepts": concepts})
    stages.append(StageRun("banks", bank_key, banks.reused, _since(t0)))
    log(f"banks: {'reused' if banks.reused else 'fitted'} at {layer} ({bank_dir})")

    # 3. correction training data: a seeded subset of the training split with artifact masks
    t0 = time.perf_counter()
    sub_key = stage_key("subset", cfg.train.data.to_dict(), cfg.artifact, cfg.n_correction_images, cfg.seed)
    sub_path = model_dir / "subsets" / f"{cfg.artifact}-{sub_key}.npz"
    sub_reused = sub_path.exists()
    pos, masks = _correction_subset(ds, cfg, sub_path)
    opt_state = _optimizer_state(model_dir / "train_state.pt")
    data = CorrectionData(
        layer=layer,
        cav=banks.cav,
        mu0=banks.mu0,
        cav_svm=banks.cav_svm,
        images=Xtr[pos],
        labels=ytr[pos],
        masks=masks,
        artifact=cfg.artifact,
        optimizer_state=opt_state,
    )
    stages.append(StageRun("subset", sub_key, sub_reused, _since(t0)))

    # 4. versions
    eval_data = None
    cards: list[ModelCard] = []
    dirs: dict[str, Path] = {}
    registered: dict[str, tuple[str, bool]] = {}
    bar = progress("versions", len(cfg.corrections)) if progress else None
    from medaudit.models.build import correct_and_evaluate, version_name

    for name in cfg.corrections:
        t0 = time.perf_counter()
        corr = cfg.correction(name)
        version = version_name(corr, cfg.artifact)
        vdir = model_dir / "versions" / version
        vkey = stage_key(
            "version", weights_sha, bank_key, sub_key, name, corr.params, layer, cfg.max_artifact_samples,
            cfg.n_eval_images, cfg.opset, opt_state is not None,
        )  # fmt: skip
        card = _valid_version(vdir, vkey)
        if card is None:
            if eval_data is None:
                from medaudit.models.evaluate import synthderm_eval_data

                eval_data = synthderm_eval_data(
                    ds,
                    mcfg,
                    artifact=cfg.artifact,
                    cav=banks.cav,
                    cav_layer=layer,
                    cav_kind="signal",
                    max_artifact_samples=cfg.max_artifact_samples,
                    tcav_class=focus,
                    cache_dir=cache,
                )
                eval_data = _first_n(eval_data, cfg.n_eval_images)
            log(f"{version}: building")
            (vdir / "build.json").unlink(missing_ok=True)
            res = correct_and_evaluate(
                model, mcfg, corr, data, eval_data, vdir.parent, model_name=cfg.model_name, opset=cfg.opset,
                log=log,
            )  # fmt: skip
            card = res.card
            _version_bank(banks.detection, f"{cfg.model_name}:{version}").save(vdir / "bank")
            (vdir / "build.json").write_text(json.dumps({"key": vkey, "version": version}, indent=2) + "\n")
            stages.append(StageRun(version, vkey, False, _since(t0)))
        else:
            stages.append(StageRun(version, vkey, True, _since(t0)))
            log(f"{version}: reused {vdir}")
        cards.append(card)
        dirs[version] = vdir
        if register is not None:
            registered[version] = register(
                cfg.model_name,
                version,
                weights=vdir / "model.pt",
                onnx=vdir / "model.onnx",
                card_dir=vdir,
                bank_dir=vdir / "bank",
            )
            tag, created = registered[version]
            log(f"{version}: {'registered' if created else 'already registered'} as {tag}")
        if bar:
            bar(1)

    # 5. comparison table
    rows = tuple(acceptance(cards, cfg.train.data.spec, cfg.artifact))
    md_path, json_path = model_dir / "comparison.md", model_dir / "comparison.json"
    md_path.write_text(comparison_report(cards, rows))
    json_path.write_text(json.dumps({"rows": list(rows), "stages": [asdict(s) for s in stages]}, indent=2))
    total = _since(t_start)
    log(f"build finished in {total:.1f} s; comparison: {md_path}")
    return BuildResult(
        model_dir, tuple(cards), dirs, registered, rows, md_path, json_path, tuple(stages), total
    )


# --------------------------------------------------------------------------------- acceptance


#: Acceptance of a correction: it must win back ≥ 50 % of the original's clean→attacked accuracy gap on the
#: images of the class the artifact pushes away from, lose ≤ 3 points of clean accuracy and cut
#: artifact relevance by ≥ 50 %.
MIN_GAP_RECOVERED, MAX_CLEAN_LOSS_PTS, MIN_RELEVANCE_CUT = 50.0, 3.0, 50.0


def acceptance(
    cards: Sequence[ModelCard], spec: Mapping[str, tuple[float, float]], artifact: str
) -> list[dict[str, Any]]:
    """:func:`medaudit.models.cards.comparison_rows` plus the acceptance columns, against ``vanilla``.

    The "victim" class is the one the artifact is *not* correlated with (malignant for band-aids):
    adding the artifact pushes its images to the other class. Columns: its gap recovered
    100·(att_v − att_0)/(clean_0 − att_0), the clean-accuracy change in points, the artifact
    relevance cut 100·(1 − rel_v/rel_0), and whether all three thresholds hold.
    """
    rows = comparison_rows(cards)
    base = next((c for c in cards if c.correction.get("name") == "vanilla"), None)
    labels = list(cards[0].architecture.get("labels", [])) if cards else []
    rates = spec.get(artifact, (0.0, 0.0))
    victim = labels[int(np.argmin(rates))] if labels else ""
    for row, card in zip(rows, cards, strict=True):
        row.update({f"{victim} gap recovered %": None, "clean Δ pts": None, "relevance cut %": None})
        row["meets criteria"] = False
        if base is None:
            continue
        b, m = base.metrics, card.metrics
        key = f"accuracy_{victim}"
        b_clean, b_att = b["classification"]["clean"].get(key), b["classification"]["attacked"].get(key)
        att = m["classification"]["attacked"].get(key)
        gap = None if b_clean is None or b_att is None else b_clean - b_att
        rec = 100.0 * (att - b_att) / gap if gap and gap > 0 and att is not None else None
        d_clean = 100.0 * (
            m["classification"]["clean"]["accuracy"] - b["classification"]["clean"]["accuracy"]
        )
        r0, r = b["artifact_relevance"]["mean"], m["artifact_relevance"]["mean"]
        cut = 100.0 * (1 - r / r0) if r0 and r is not None else None
        row[f"{victim} gap recovered %"] = rec
        row["clean Δ pts"] = d_clean
        row["relevance cut %"] = cut
        tol = 1e-9  # a value on a threshold passes despite float round-off
        row["meets criteria"] = bool(
            card is not base
            and rec is not None
            and rec >= MIN_GAP_RECOVERED - tol
            and d_clean >= -MAX_CLEAN_LOSS_PTS - tol
            and cut is not None
            and cut >= MIN_RELEVANCE_CUT - tol
        )
    return rows


def comparison_report(cards: Sequence[ModelCard], rows: Sequence[Mapping[str, Any]]) -> str:
    """The paper-style table (:func:`medaudit.models.cards.comparison_markdown`) plus the acceptance table."""
    extra = [k for k in rows[0] if k not in comparison_rows(cards)[0]] if rows else []
    out = ["# Model versions", "", comparison_markdown(cards), "## Correction criteria", ""]
    out.append(
        f"Thresholds: gap recovered ≥ {MIN_GAP_RECOVERED:g} %, clean accuracy loss ≤ "
        f"{MAX_CLEAN_LOSS_PTS:g} points, artifact relevance cut ≥ {MIN_RELEVANCE_CUT:g} % (vs `vanilla`)."
    )
    out += ["", "| version | " + " | ".join(extra) + " |", "|---|" + "---|" * len(extra)]
    for r in rows:
        cells = [_cell(r[k]) for k in extra]
        out.append(f"| {r['version']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------- planted artifact


def hidden_artifact_config(
    base: TrainConfig, artifact: str = "timestamp", rates: tuple[float, float] = (0.1, 0.0)
) -> TrainConfig:
    """``base`` with ``artifact`` planted at ``rates`` (fraction of benign, malignant) in its data.

    The discovery acceptance experiment: train on this, audit without declaring ``artifact`` and
    count how many top-ranked outliers carry it
    (:attr:`medaudit.models.audit.results.Discovery.hits`).
    """
    return replace(base, data=base.data.with_spec(**{artifact: rates}))


def train_with_hidden_artifact(
    out_dir: str | Path,
    artifact: str = "timestamp",
    rates: tuple[float, float] = (0.0, 0.1),
    base: TrainConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains (or resumes) the acceptance experiment's model: ``base`` (default: the demo config)
    with ``artifact`` planted at ``rates``; returns its card (see :func:`medaudit.models.train.train`)."""
    tcfg = hidden_artifact_config(base or TrainConfig(), artifact, rates)
    return train(tcfg, out_dir, cache_dir=cache_dir, progress=progress, log=log)


# --------------------------------------------------------------------------------- stages


@dataclass(frozen=True, eq=False)
class _Banks:
    detection: ConceptBank  # svm, every drawn artifact, for serving
    correction: ConceptBank  # signal, the correction artifact within cav_scope
    cav_svm: np.ndarray  # reactive P-ClArC's gate, fitted on the correction bank's samples
    reused: bool

    @property
    def cav(self) -> np.ndarray:
        return np.asarray(self.correction[self.correction.concepts[0]].cav.v, np.float64)

    @property
    def mu0(self) -> np.ndarray:
        return np.asarray(self.correction[self.correction.concepts[0]].mu0, np.float64)


def _fit_banks(
    model: torch.nn.Module,
    mcfg: Any,
    ds: SynthDerm,
    layer: str,
    Xtr: torch.Tensor,
    ytr: torch.Tensor,
    concepts: list[str],
    cfg: BuildConfig,
    scope: tuple[int, ...] | None,
    base_tag: str,
    cache: Path,
    progress: Progress | None,
    log: Callable[[str], None],
) -> _Banks:
    log(f"banks: activations of the original model at {layer}")
    acts = pooled_activations(model, mcfg, layer, Xtr)
    done = [(Xtr, acts)]  # (images, φ) whose rows later renders of the training split may share
    Xval, _ = render_split(ds, "val", "clean", cfg.artifact, cache_dir=cache, progress=progress)
    val = pooled_activations(model, mcfg, layer, Xval)
    tr_idx = ds.indices("train")
    member = {a: ds.membership[a][tr_idx].astype(np.int64) for a in concepts}
    prov = {"fitted_on": base_tag, "pooling": "max", "activations": "original model"}
    detection = ConceptBank.fit(
        base_tag, layer, acts, member, val, kind="svm", dataset="synthderm", seed=cfg.seed,
        target_fpr=cfg.target_fpr, provenance={**prov, "cav_scope": None},
    )  # fmt: skip
    if cfg.cav_data == "paired":
        log(f"banks: counterfactual pairs, the training split without and with {cfg.artifact}")
        pairs = render_splits(ds, "train", ("clean", "attacked"), cfg.artifact, cache, progress)
        Xc, Xa = pairs["clean"][0], pairs["attacked"][0]
        pair_acts = np.concatenate([_pooled_reusing(model, mcfg, layer, X, done) for X in (Xc, Xa)])
        t_pair = np.repeat(np.array([0, 1], np.int64), len(Xc))
        correction = ConceptBank.fit(
            base_tag, layer, pair_acts, {cfg.artifact: t_pair}, val, kind="signal", dataset="synthderm",
            seed=cfg.seed, target_fpr=cfg.target_fpr, provenance={**prov, "cav_data": "paired"},
        )  # fmt: skip
        gate = fit_cav(pair_acts, t_pair, kind="svm", seed=cfg.seed).v
        return _Banks(detection, correction, np.asarray(gate, np.float64), reused=False)
    keep = np.ones(len(ytr), bool) if scope is None else np.isin(ytr.numpy(), scope)
    t = np.where(keep, member[cfg.artifact], -1)
    correction = ConceptBank.fit(
        base_tag, layer, acts, {cfg.artifact: t}, val, kind="signal", dataset="synthderm", seed=cfg.seed,
        target_fpr=cfg.target_fpr, provenance={**prov, "cav_scope": scope},
    )  # fmt: skip
    gate = fit_cav(acts[keep], t[keep], kind="svm", seed=cfg.seed).v  # as fit_correction_data does
    return _Banks(detection, correction, np.asarray(gate, np.float64), reused=False)


def _pooled_reusing(
    model: torch.nn.Module,
    mcfg: Any,
    layer: str,
    images: torch.Tensor,
    done: list[tuple[torch.Tensor, np.ndarray]],
) -> np.ndarray:
    """φ of ``images`` through :func:`medaudit.models.train.reusing`: the counterfactual pairs are the
    training split rendered "clean" and "attacked", and their rows equal to a "ch" row (on the
    default build 903 + 484 of the 3600 pair rows) reuse its φ."""
    return reusing(images, done, lambda x: pooled_activations(model, mcfg, layer, x))


def _save_banks(banks: _Banks, directory: Path, meta: Mapping[str, Any]) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    banks.detection.save(tmp / "detection")
    banks.correction.save(tmp / "correction")
    np.save(tmp / "gate.npy", banks.cav_svm)
    (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=2, default=str) + "\n")
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.replace(directory)


def _load_banks(directory: Path) -> _Banks | None:
    if not (directory / "meta.json").exists():
        return None
    try:
        return _Banks(
            ConceptBank.load(directory / "detection"),
            ConceptBank.load(directory / "correction"),
            np.load(directory / "gate.npy"),
            reused=True,
        )
    except Exception:  # a damaged stage output is rebuilt, not trusted
        return None


def _correction_subset(ds: SynthDerm, cfg: BuildConfig, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into the training split) of the fine-tuning subset and their artifact masks."""
    if path.exists():
        with np.load(path) as z:
            return torch.from_numpy(z["pos"]), torch.from_numpy(z["masks"])
    tr_idx = ds.indices("train")
    n = len(tr_idx) if cfg.n_correction_images == 0 else min(cfg.n_correction_images, len(tr_idx))
    pos = np.sort(np.random.default_rng([cfg.seed, 0x5B5E7]).permutation(len(tr_idx))[:n])
    size = cfg.train.data.size
    masks = np.zeros((n, size, size), np.float32)
    member = ds.membership[cfg.artifact]
    for j, p in enumerate(pos):
        i = int(tr_idx[p])
        if member[i]:  # only artifact samples have a mask; the rest stay zero (method.md §4.6)
            masks[j] = ds.sample(i, "ch", cfg.artifact).masks[cfg.artifact]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, pos=pos, masks=masks)
    tmp.replace(path)
    return torch.from_numpy(pos), torch.from_numpy(masks)


def _optimizer_state(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("optimizer") if isinstance(state, dict) else None


def _valid_version(vdir: Path, key: str) -> ModelCard | None:
    """The version's card when ``build.json`` has ``key`` and the files match the card's hashes."""
    try:
        if json.loads((vdir / "build.json").read_text()).get("key") != key:
            return None
        card = ModelCard.load(vdir)
        if not (vdir / "bank" / "bank.json").exists() or not (vdir / CARD_JSON).exists():
            return None
        for kind, fname in (("weights", "model.pt"), ("onnx", "model.onnx")):
            if sha256_file(vdir / fname) != card.files[kind]["sha256"]:
                return None
        return card
    except (OSError, ValueError, KeyError):
        return None


def _first_n(data: EvalData, n: int) -> EvalData:
    """``data`` with its test variants and retrieval set cut to the first ``n`` images (0: all)."""
    if n <= 0:
        return data
    sets = {k: EvalSet(s.images[:n], s.labels[:n]) for k, s in data.sets.items()}
    info = {**data.info, "n_eval_images": min(n, len(data.retrieval_labels))}
    images, labels = data.retrieval_images[:n], data.retrieval_labels[:n]
    return replace(data, sets=sets, retrieval_images=images, retrieval_labels=labels, info=info)


def _version_bank(bank: ConceptBank, tag: str) -> ConceptBank:
    """The detection bank under the version's tag.

    The bank's activations are the original model's at ℓ; every version has those same activations
    there (the fine-tuning corrections freeze everything up to and including ℓ, §4.1, and the
    ClArC projections act on ℓ's output, which the bank reads before the projection).
    """
    prov = replace(bank.provenance, extra={**bank.provenance.extra, "version": tag})
    return ConceptBank(tag, bank.layer, {c: bank[c] for c in bank}, prov, bank.target_fpr)


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)
