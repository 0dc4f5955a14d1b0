"""The offline build (architecture.md): data → train → CAVs → corrections → evaluate → export → store.

:func:`build` runs the whole demo pipeline for one artifact:

1. **data + train**: the data is synthderm (``BuildConfig.data`` empty) or any annotated dataset
   on disk (``"folder:/path"``, ``"isic2019:/path"``, …; :mod:`medaudit.models.build_data`).
   :func:`medaudit.models.train.train` trains on the synthderm config (resumable; a finished run
   only re-reads its card); the checkpoint is ``<out>/<arch>-synthderm/model.pt``, the same place
   ``medaudit train`` writes by default. With a **model spec** (``BuildConfig.model``: a
   classifier medaudit did not train, :mod:`medaudit.models.spec`) nothing is trained: the spec's
   checkpoint is the original, the data is read at its input size, and everything lands in
   ``<out>/<spec name>``, registered as ``<spec name>:<version>``. Data other than synthderm
   needs a spec. Every check of the data against the config (labels, artifact, masks, scope) runs
   before anything is built.
2. **concept banks** at the correction layer ℓ (:mod:`medaudit.models.banks`), from the
   **original** model's max-pooled activations on the training split (method.md §1.1, §11.7): a
   ``signal`` bank for the correction artifact (counterfactual pairs where the data can render
   them, else membership within ``cav_scope``; the CAV v and μ0, §1.3) plus the SVM gate of
   reactive P-ClArC fitted on the same samples (§4.3), and an ``svm`` bank of every artifact
   annotated in the training split, calibrated on clean validation images, for detection (§1.3).
3. **corrections**: every name in ``BuildConfig.corrections`` through
   :func:`medaudit.models.build.correct_and_evaluate` (correct → save → ONNX export → parity →
   §7 evaluation → card). Fine-tuning corrections train on a seeded subset of the training split.
4. the **comparison table** (Markdown + JSON), with the acceptance columns (:func:`acceptance`),
   then **register** (optional callback, so that ``models`` never imports the store; the CLI passes
   :func:`medaudit.service.store.register_version`): every version once all are built, and the
   ones this build created are removed again (``unregister``) if one fails, so a failed build
   leaves no half-registered model.

Every stage is keyed by a hash of its inputs (base weights sha256, configs, stage format) and its
outputs are reused while the key matches and the files are intact (sha256 of weights and ONNX
checked against the card), so re-running the build only redoes what changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medaudit.models.acceptance import acceptance as acceptance
from medaudit.models.acceptance import best_version, comparison_report, comparison_summary, victim_class
from medaudit.models.banks import Banks, SharedActivations, fit_banks, load_banks, save_banks
from medaudit.models.build_data import BuildData, build_data
from medaudit.models.cards import CARD_JSON, ModelCard
from medaudit.models.corrections import CORRECTIONS, Correction, CorrectionData, FinetuneConfig
from medaudit.models.corrections.settings import CorrectionSettings, make_correction, resolve
from medaudit.models.data.registry import label_order_hint
from medaudit.models.errors import ConfigError
from medaudit.models.evaluate import EvalData, EvalSet
from medaudit.models.registry import ModelCfg
from medaudit.models.spec import ModelSpec
from medaudit.models.train import Progress, TrainConfig, sha256_file, train
from medaudit.models.xai.cav import cv_workers
from medaudit.models.xai.concepts import ConceptBank

#: Bump when a stage's outputs change meaning, so old outputs are not reused.
PIPELINE_VERSION = 2  # 2: fine-tunes resume the base run's optimiser state, not the previous one's
DEFAULT_CORRECTIONS = ("vanilla", "vanilla-ft", "pclarc", "rpclarc", "rrclarc", "rrr")

#: ``register(name, version, weights, onnx, card_dir, bank_dir) -> (tag, created)``.
Register = Callable[..., tuple[str, bool]]
#: ``unregister(tag)``: removes a version this build registered, when a later one fails.
Unregister = Callable[[str], Any]
#: ``BuildConfig.cav_scope`` values besides a list of class names.
CAV_SCOPES = ("artifact_class", "all")


@dataclass(frozen=True)
class BuildConfig:
    """What the demo build makes. Data and training default to the dataclass defaults of
    :class:`~models.train.TrainConfig` / :class:`~models.data.synthetic.SynthDermConfig`.

    Attributes:
        train: Base training (and data) config.
        artifact: The artifact to correct for (a synthderm artifact with a nonzero rate).
        layer: CAV / correction layer ℓ; "" = the architecture's ``default_cav_layer``.
        data: The dataset: ``""`` = synthderm from ``train.data``; else a dataset spec
            (``folder:/path``, ``isic2019:/path``, …: ``medaudit.models.data.registry``), which
            needs ``model``.
        cav_scope: The classes whose training samples fit the membership correction CAV and μ0
            (method.md §1.1's ``cav_scope``): ``"artifact_class"``, the class the artifact is
            correlated with (the paper's controlled setting); ``"all"``, every class; or a tuple
            of class names.
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
    cav_scope: str | tuple[str, ...] = "artifact_class"
    #: ``"paired"``: fit the correction CAV, μ0 and the rP-ClArC gate on counterfactual pairs, every
    #: training image rendered without and with the artifact (synthderm can draw both), so v is
    #: the artifact's direction alone. ``"membership"``: the paper's recipe, artifact vs
    #: no-artifact samples within ``cav_scope`` (method.md §1.1). Membership CAVs pick up whatever
    #: the artifact co-occurs with: with band-aids on biopsied (ambiguous-looking) benign lesions,
    #: v also points along "malignant-looking", and P-ClArC then moved malignant images toward
    #: benign (measured: attacked malignant accuracy 0.664 -> 0.320). Data that cannot render
    #: pairs (everything on disk) uses membership whatever this says.
    cav_data: str = "paired"
    corrections: tuple[str, ...] = DEFAULT_CORRECTIONS
    finetune: FinetuneConfig | None = None
    #: Per-correction settings (layer ℓ, optimiser, lr, epochs, λ) over the architecture family's
    #: defaults (:mod:`medaudit.models.corrections.settings`); ``{}`` = the defaults.
    settings: Mapping[str, CorrectionSettings] = field(default_factory=dict)
    n_correction_images: int = 800
    n_eval_images: int = 0
    max_artifact_samples: int = 64
    opset: int = 17
    seed: int = 0
    target_fpr: float = 0.05
    threads: int = 0
    #: A classifier medaudit did not train (its spec); None: train ``train.arch`` on the data.
    model: ModelSpec | None = None
    data: str = ""

    def __post_init__(self) -> None:
        synthderm = self.data in ("", "synthderm")
        if not synthderm and self.model is None:
            raise ConfigError(
                f"data {self.data!r}: medaudit trains only on synthderm; build a classifier of your own "
                "on your data with --model SPEC (docs/models.md)"
            )
        if self.model is not None:
            side = self.model.input_size[-1]
            if self.model.input_size[1] != side:
                raise ConfigError(
                    f"{self.model.path} takes {list(self.model.input_size)}: square inputs only"
                )
            if synthderm and self.train.data.size != side:
                raise ConfigError(
                    f"the data is rendered at {self.train.data.size} px but {self.model.path} takes "
                    f"{list(self.model.input_size)}: build with data of size {side} (square inputs only)"
                )
        unknown = [c for c in self.corrections if c not in CORRECTIONS]
        if unknown:
            raise ConfigError(f"unknown corrections {unknown}; valid: {', '.join(CORRECTIONS)}")
        stray = [c for c in self.settings if c not in self.corrections]
        if stray:
            raise ConfigError(
                f"settings for {stray}, which this build does not make; it makes: "
                f"{', '.join(self.corrections)}"
            )
        for name, s in self.settings.items():  # a training-free correction refuses a schedule now
            make_correction(CORRECTIONS[name], s, self.finetune)
        if isinstance(self.cav_scope, str) and self.cav_scope not in CAV_SCOPES:
            raise ConfigError(
                f"cav_scope={self.cav_scope!r}; valid: 'artifact_class', 'all' or a list of class names"
            )
        if not isinstance(self.cav_scope, str) and not self.cav_scope:
            raise ConfigError("cav_scope is an empty list of classes; name at least one")
        if self.cav_data not in ("paired", "membership"):
            raise ConfigError(f"cav_data={self.cav_data!r}; valid: 'paired', 'membership'")
        rates = self.train.data.spec.get(self.artifact)
        if synthderm and (rates is None or max(rates) <= 0):
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
        ``<arch>-synthderm`` for the model medaudit trains (``<arch>-synthderm-<k>class`` on
        synthderm's k-class forms)."""
        if self.model is not None:
            return self.model.name
        d = self.train.data
        return f"{self.train.arch}-synthderm" + ("" if d.plain else f"-{len(d.classes)}class")

    def correction_settings(
        self,
        name: str,
        family: str,
        build_layer: str,
        hook_points: Mapping[str, str] | Sequence[str] | None = None,
    ) -> CorrectionSettings:
        """What correction ``name`` runs with on architecture ``family`` (``ModelCfg.canonizer``):
        this config's settings over the family's defaults (their layer where the model has it as a
        hook point, under the model's name for it: :func:`~models.corrections.settings.resolve`)
        over the build layer."""
        return resolve(name, family, build_layer, self.settings.get(name), hook_points)

    def correction(self, name: str, settings: CorrectionSettings | None = None) -> Correction:
        """Correction ``name`` with ``settings`` (default: none beyond ``finetune``) applied."""
        return make_correction(CORRECTIONS[name], settings or CorrectionSettings(), self.finetune)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        d["finetune"] = None if self.finetune is None else self.finetune.to_dict()
        d["settings"] = {k: v.to_dict() for k, v in self.settings.items()}
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
    def best(self) -> str | None:
        """The best corrected version by the criteria (:func:`~models.acceptance.best_version`):
        what the demo serves beside ``vanilla``."""
        return best_version(self.comparison)

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
    unregister: Unregister | None = None,
) -> BuildResult:
    """Builds (or reuses) every stage for ``cfg``; see the module docstring.

    Args:
        cfg: The build config.
        out_dir: Root folder; the model family goes to ``<out_dir>/<model name>``.
        progress: ``progress(description, total) -> advance(n)``, one bar per long step.
        log: Line logger.
        register: Called once per version, after every version is built, with ``(name, version,
            weights=, onnx=, card_dir=, bank_dir=)``; returns ``(tag, created)``. None: nothing
            is registered.
        unregister: Called with the tag of each version this build registered when registering a
            later one fails (then the error is raised again).

    Raises:
        ConfigError: The data does not fit the config (its labels are not the model's, the
            artifact is not annotated, RRR without masks, a class in ``cav_scope`` it lacks),
            before anything is built.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the CAV fits' regularisation CV on as many processes as torch has threads (liblinear is one
    # thread; the fits are bit-identical to the serial ones)
    with cv_workers(torch.get_num_threads()):
        return _build(cfg, out_dir, progress, log, register=register, unregister=unregister)


def _build(
    cfg: BuildConfig,
    out_dir: str | Path,
    progress: Progress | None,
    log: Callable[[str], None],
    *,
    register: Register | None,
    unregister: Unregister | None,
) -> BuildResult:
    t_start = time.perf_counter()
    stages: list[StageRun] = []
    model_dir = Path(out_dir) / cfg.model_name
    cache = model_dir / "cache"
    side = cfg.model.input_size[-1] if cfg.model is not None else cfg.train.data.size
    data = build_data(cfg.data, cfg.train.data, side, cache, cfg.artifact, progress, model=cfg.model)
    focus, scope, cav_data = check_data(cfg, data)

    # 1. train (models.train.train is itself resumable and idempotent), or the spec's model
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
    plan = correction_plan(cfg, mcfg, layer)
    Xtr, ytr = data.train()
    base_tag = f"{cfg.model_name}:vanilla"

    # 2. concept banks on the original model
    t0 = time.perf_counter()
    concepts = list(data.train_membership())

    # the build layer's banks, then the correction CAV, μ0 and gate at every other layer a
    # correction runs at (detection stays at the build layer: every version keeps the layers up to
    # it, see correction_plan); the layers still to fit share one forward per image set
    others = tuple(dict.fromkeys(s.layer for s in plan.values() if s.layer != layer))
    keys = {
        at: stage_key(
            "banks",
            weights_sha,
            data.key(),
            at,
            cfg.artifact,
            scope,
            concepts,
            cfg.seed,
            cfg.target_fpr,
            cav_data,
            *(() if at == layer else ("correction only",)),
        )  # fmt: skip
        for at in (layer, *others)
    }
    loaded = {at: load_banks(model_dir / "banks" / key) for at, key in keys.items()}
    to_fit = tuple(at for at, b in loaded.items() if b is None)
    shared = SharedActivations(model, mcfg, to_fit) if len(to_fit) > 1 else None

    def bank_stage(at: str) -> tuple[Banks, str, Path]:
        """The banks fitted at ``at`` on the original model: loaded when its stage key matches,
        else fitted and saved."""
        key, bdir = keys[at], model_dir / "banks" / keys[at]
        fitted = loaded[at]
        if fitted is None:
            fitted = fit_banks(
                model, mcfg, data, at, Xtr, ytr, artifact=cfg.artifact, scope=scope, cav_data=cav_data,
                base_tag=base_tag, seed=cfg.seed, target_fpr=cfg.target_fpr, log=log,
                detection=at == layer, shared=shared,
            )  # fmt: skip
            save_banks(fitted, bdir, {"key": key, "layer": at, "scope": scope, "concepts": concepts})
        return fitted, key, bdir

    banks, bank_key, bank_dir = bank_stage(layer)
    stages.append(StageRun("banks", bank_key, banks.reused, _since(t0)))
    log(f"banks: {'reused' if banks.reused else 'fitted'} at {layer} ({bank_dir})")

    # 3. correction training data: a seeded subset of the training split with artifact masks
    t0 = time.perf_counter()
    sub_key = stage_key("subset", data.key(), cfg.artifact, cfg.n_correction_images, cfg.seed)
    sub_path = model_dir / "subsets" / f"{cfg.artifact}-{sub_key}.npz"
    sub_reused = sub_path.exists()
    pos, masks = _correction_subset(data, cfg, sub_path)
    opt_state = _optimizer_state(model_dir / "train_state.pt")
    corr_data = CorrectionData(
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
    cav_card = {
        "cav_data": cav_data,
        "cav_scope": None if scope is None else [data.label_names[k] for k in scope],
        "dataset": data.name,
        "mask_source": data.mask_source,
    }

    # 3b. the banks at the corrections' other layers (their φ mostly computed in stage 2)
    layer_data = {layer: (corr_data, bank_key)}
    for other in others:
        t0 = time.perf_counter()
        ob, okey, odir = bank_stage(other)
        layer_data[other] = (
            replace(corr_data, layer=other, cav=ob.cav, mu0=ob.mu0, cav_svm=ob.cav_svm),
            okey,
        )
        stages.append(StageRun(f"banks@{other}", okey, ob.reused, _since(t0)))
        log(f"banks: {'reused' if ob.reused else 'fitted'} at {other} ({odir})")

    # 4. versions
    eval_data = None
    cards: list[ModelCard] = []
    dirs: dict[str, Path] = {}
    bar = progress("versions", len(cfg.corrections)) if progress else None
    from medaudit.models.build import correct_and_evaluate, version_name

    for name in cfg.corrections:
        t0 = time.perf_counter()
        corr = cfg.correction(name, plan[name])
        version = version_name(corr, cfg.artifact)
        vdir = model_dir / "versions" / version
        vdata, vbank = layer_data[plan[name].layer]
        vkey = stage_key(
            "version", weights_sha, bank_key, vbank, sub_key, name, corr.params, plan[name].layer, layer,
            cfg.max_artifact_samples, cfg.n_eval_images, cfg.opset, opt_state is not None,
        )  # fmt: skip
        card = _valid_version(vdir, vkey)
        if card is None:
            if eval_data is None:
                eval_data = data.eval_data(
                    mcfg, artifact=cfg.artifact, cav=banks.cav, layer=layer,
                    max_artifact_samples=cfg.max_artifact_samples, tcav_class=focus, seed=cfg.seed,
                )  # fmt: skip
                eval_data = _first_n(eval_data, cfg.n_eval_images)
                if cfg.artifact in banks.detection.concepts:  # §7: svm CAV for Vanilla and RRR TCAV
                    svm = np.array(banks.detection[cfg.artifact].cav.v, np.float64)  # a writable copy
                    eval_data = replace(eval_data, cav_svm=svm)
            log(f"{version}: building")
            (vdir / "build.json").unlink(missing_ok=True)
            res = correct_and_evaluate(
                model, mcfg, corr, vdata, eval_data, vdir.parent, model_name=cfg.model_name,
                opset=cfg.opset, log=log, data_info={**eval_data.info, **cav_card},
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
        if bar:
            bar(1)

    # 5. comparison table
    rates = {cfg.artifact: data.rates(cfg.artifact)}
    rows = tuple(acceptance(cards, rates, cfg.artifact))
    md_path, json_path = model_dir / "comparison.md", model_dir / "comparison.json"
    md_path.write_text(comparison_report(cards, rows, focus_class=victim_class(cards, rates, cfg.artifact)))
    summary = comparison_summary(cards, rows)
    json_path.write_text(json.dumps({**summary, "stages": [asdict(s) for s in stages]}, indent=2))
    ranking = ", ".join(summary["ranking"])
    log(f"best version by the correction criteria: {summary['best']} (ranking: {ranking})")
    for w in summary["warnings"]:
        log(f"warning: {w}")

    # 6. register every version, or none
    registered: dict[str, tuple[str, bool]] = {}
    if register is not None:
        registered = _register_all(cfg.model_name, dirs, register, unregister, log)
    total = _since(t_start)
    log(f"build finished in {total:.1f} s; comparison: {md_path}")
    return BuildResult(
        model_dir, tuple(cards), dirs, registered, rows, md_path, json_path, tuple(stages), total
    )


def correction_plan(cfg: BuildConfig, mcfg: ModelCfg, layer: str) -> dict[str, CorrectionSettings]:
    """Each correction's settings (:meth:`BuildConfig.correction_settings`), after checking their
    layers: a hook point of the model at or after the build layer ``layer``.

    Every version is served with the detection bank fitted at ``layer`` on the original model, so
    each must leave the original's activations up to ``layer`` untouched: a fine-tune freezes up to
    its ℓ and a projection acts after its ℓ, both fine at ``layer`` or later, not before it.

    Raises:
        ConfigError: A layer that is not a hook point, or one before ``layer``.
    """
    order = list(mcfg.hook_points)
    plan = {}
    for name in cfg.corrections:
        s = cfg.correction_settings(name, mcfg.canonizer, layer, mcfg.hook_points)
        if name == "vanilla":
            s = CorrectionSettings(layer=layer)  # the original: no layer, nothing to set
        if s.layer not in order:
            raise ConfigError(
                f"{name}: layer {s.layer!r} is not a hook point of {mcfg.arch}; valid: {', '.join(order)}"
            )
        if layer in order and order.index(s.layer) < order.index(layer):
            raise ConfigError(
                f"{name} at {s.layer} would change the activations at the build layer {layer}, where every "
                f"version's concept bank is fitted: use a layer from {layer} on, or move the build layer "
                f"(--layer {s.layer})"
            )
        plan[name] = s
    return plan


def check_data(cfg: BuildConfig, data: BuildData) -> tuple[int, tuple[int, ...] | None, str]:
    """The artifact's class, the correction CAV's class scope and its data (paired or membership)
    for ``cfg`` on ``data``, after checking that the two fit.

    Raises:
        ConfigError: The model's labels are not the data's classes, the artifact is annotated on
            no training image, RRR is asked for on data without masks, or ``cav_scope`` names a
            class the data lacks.
    """
    labels = data.label_names
    if cfg.model is not None and tuple(cfg.model.labels) != tuple(labels):
        raise ConfigError(
            f"{cfg.model.path} has labels [{', '.join(cfg.model.labels)}] but {data.name} has classes "
            f"[{', '.join(labels)}]: the spec's labels must be the data's classes, in index order "
            f"({label_order_hint(data.name, cfg.model.labels)})"
        )
    side = cfg.model.input_size[-1] if cfg.model is not None else data.size
    if data.size != side:
        raise ConfigError(
            f"the data is rendered at {data.size} px but the model takes {side}: render it at {side}"
        )
    drawn = data.train_membership()
    if cfg.artifact not in drawn:
        raise ConfigError(
            f"no training image of {data.name} is annotated with {cfg.artifact!r}; annotated: "
            f"{', '.join(drawn) or 'none'}"
        )
    if "rrr" in cfg.corrections and data.mask_source == "none":
        model = f" --model {cfg.model.path}" if cfg.model is not None else ""
        raise ConfigError(
            f"rrr needs masks of {cfg.artifact} and {data.name} has none: derive them from the concept "
            f"with `medaudit localize --data {data.name} --artifact {cfg.artifact}{model} --export-masks`, "
            "then build again, or leave rrr out of --corrections"
        )
    focus = int(np.argmax(data.rates(cfg.artifact)))
    if cfg.cav_scope == "artifact_class":
        scope: tuple[int, ...] | None = (focus,)
    elif cfg.cav_scope == "all":
        scope = None
    else:
        unknown = [c for c in cfg.cav_scope if c not in labels]
        if unknown:
            raise ConfigError(
                f"cav_scope names classes {unknown} that the data lacks; classes: {', '.join(labels)}"
            )
        scope = tuple(sorted({labels.index(c) for c in cfg.cav_scope}))
    cav_data = cfg.cav_data if data.can_pair else "membership"
    return focus, scope, cav_data


def _register_all(
    name: str,
    dirs: Mapping[str, Path],
    register: Register,
    unregister: Unregister | None,
    log: Callable[[str], None],
) -> dict[str, tuple[str, bool]]:
    """Registers every built version; if one fails, removes those this call created and re-raises."""
    registered: dict[str, tuple[str, bool]] = {}
    try:
        for version, vdir in dirs.items():
            registered[version] = register(
                name, version, weights=vdir / "model.pt", onnx=vdir / "model.onnx", card_dir=vdir,
                bank_dir=vdir / "bank",
            )  # fmt: skip
            tag, created = registered[version]
            log(f"{version}: {'registered' if created else 'already registered'} as {tag}")
    except Exception:
        created_now = [tag for tag, created in registered.values() if created]
        if unregister is not None:
            for tag in created_now:
                unregister(tag)
            log(f"registration failed; removed {', '.join(created_now) or 'nothing'} again")
        raise
    return registered


# --------------------------------------------------------------------------------- stages


def _correction_subset(data: BuildData, cfg: BuildConfig, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into the training split) of the fine-tuning subset and their artifact masks."""
    if path.exists():
        with np.load(path) as z:
            return torch.from_numpy(z["pos"]), torch.from_numpy(z["masks"])
    n_train = len(data.tr_idx)
    n = n_train if cfg.n_correction_images == 0 else min(cfg.n_correction_images, n_train)
    pos = np.sort(np.random.default_rng([cfg.seed, 0x5B5E7]).permutation(n_train)[:n])
    masks = data.train_masks(pos, cfg.artifact)
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
    if "subsets" in info:  # what the card lists is what was evaluated
        info["subsets"] = {k: int(len(s.labels)) for k, s in sets.items()}
    images, labels = data.retrieval_images[:n], data.retrieval_labels[:n]
    return replace(data, sets=sets, retrieval_images=images, retrieval_labels=labels, info=info)


def _version_bank(bank: ConceptBank, tag: str) -> ConceptBank:
    """The detection bank under the version's tag.

    The bank's activations are the original model's at ℓ; every version has those same activations
    there (the fine-tuning corrections freeze everything up to and including ℓ, §4.1, and the
    ClArC projections act on ℓ's output, which the bank reads before the projection).
    """
    prov = replace(bank.provenance, extra={**bank.provenance.extra, "version": tag})
    return ConceptBank(tag, bank.layer, {c: bank[c] for c in bank}, prov, bank.target_fpr, bank.fpr_scope)


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)
