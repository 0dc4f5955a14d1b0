"""The model store: every model version is a BentoML model ``<model name>:<version>``.

architecture.md ("Model versions are BentoML models"): ``resnet18-synthderm:vanilla``,
``…:pclarc-band_aid``, ``…:rrclarc-band_aid``, each holding

* ``model.pt``: the version checkpoint of :func:`medaudit.models.corrections.io.save_version` (torch, for
  explanations),
* ``model.onnx``: the exported graph (ONNX Runtime, for predictions),
* ``bank/``: the version's :class:`~models.xai.concepts.ConceptBank` (detection CAVs),
* ``card.json`` / ``card.md``: its :class:`~models.cards.ModelCard`,

with BentoML metadata recording the architecture, the version and the sha256 of the weights, the
ONNX graph and every bank file. :func:`load_version` recomputes those hashes before anything is
deserialised and refuses a file whose bytes changed (:class:`IntegrityError`).

BentoML version strings allow ``[a-z0-9_.-]`` (starting and ending alphanumeric, at most 63
characters), so ``pclarc-band_aid`` is used as is; a version outside that set is refused with a
:class:`StoreError` rather than silently renamed.

The store lives at ``$BENTOML_HOME/models`` (default ``~/bentoml/models``), resolved at each call,
not at import. BentoML's own container caches that path once per process, so every call here
passes an explicit :class:`ModelStore`; tests point ``BENTOML_HOME`` (or ``home=``) at a temporary
folder. BentoML's usage tracking is switched off (``BENTOML_DO_NOT_TRACK``) unless the caller set
it: an audit service for medical models does not phone home.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medaudit.service.errors import IntegrityError, StoreError

if TYPE_CHECKING:
    from torch import nn

    from medaudit.models.cards import ModelCard
    from medaudit.models.registry import ModelCfg
    from medaudit.models.xai.concepts import ConceptBank

WEIGHTS_FILE, ONNX_FILE, BANK_DIR = "model.pt", "model.onnx", "bank"
CARD_FILES = ("card.json", "card.md")
#: Format tag written into every stored version's metadata.
STORE_FORMAT = "medaudit.version/1"
_TAG_PART = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class VersionInfo:
    """One stored version as :func:`list_versions` reports it."""

    tag: str
    name: str
    version: str
    arch: str
    created_at: str
    weights_sha256: str
    onnx_sha256: str
    path: Path


@dataclass(frozen=True, eq=False)
class LoadedVersion:
    """A verified version, ready to serve.

    Attributes:
        tag: ``<name>:<version>``.
        model: The torch model in eval mode (ClArC projection re-inserted where there is one).
        onnx_path: The verified ONNX graph inside the store.
        bank: The version's concept bank (checked to belong to ``tag``).
        card: Its model card.
        cfg: The architecture config saved with the weights.
        record: The correction record of the checkpoint (name, layer, params, projection).
        path: The version's directory in the store.
    """

    tag: str
    model: nn.Module
    onnx_path: Path
    bank: ConceptBank
    card: ModelCard
    cfg: ModelCfg
    record: Mapping[str, Any]
    path: Path


# --------------------------------------------------------------------------------- store access


def store_home(home: str | Path | None = None) -> Path:
    """``home``, else ``$BENTOML_HOME``, else ``~/bentoml`` (read now, never cached)."""
    if home is not None:
        return Path(home)
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")


def _bentoml() -> Any:
    """Imports bentoml's model API, without usage tracking and without its import-time warning.

    bentoml 1.4.40 builds a ``pathspec`` pattern at import with the deprecated ``gitwildmatch``
    name; under ``-W error`` (the test suite) that warning would abort the import. Only that
    warning is silenced, only during the import.
    """
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"GitWildMatchPattern")
        import bentoml
        import bentoml.exceptions
        import bentoml.models
        from bentoml._internal.models import ModelStore  # noqa: F401  (the store class, below)
    return bentoml


def model_store(home: str | Path | None = None) -> Any:
    """The BentoML ``ModelStore`` at ``<home>/models`` (created if missing)."""
    _bentoml()
    from bentoml._internal.models import ModelStore

    path = store_home(home) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


def check_tag_part(value: str, what: str) -> str:
    """Refuses a name or version BentoML would reject, naming the rule."""
    if len(value) > 63 or not _TAG_PART.match(value):
        raise StoreError(
            f"{what} {value!r} is not a valid BentoML tag part: use lowercase letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit, at most 63 characters"
        )
    return value


def sha256_file(path: str | Path) -> str:
    from medaudit.models.train import sha256_file as _sha

    return _sha(path)


def _bank_hashes(bank_dir: Path) -> dict[str, str]:
    return {
        p.relative_to(bank_dir).as_posix(): sha256_file(p) for p in sorted(bank_dir.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------------- register


def register_version(
    name: str = "resnet18-synthderm",
    version: str = "vanilla",
    *,
    weights: str | Path,
    onnx: str | Path,
    card_dir: str | Path,
    bank_dir: str | Path,
    labels: Mapping[str, str] | None = None,
    home: str | Path | None = None,
) -> tuple[str, bool]:
    """Stores one version as BentoML model ``name:version``; returns ``(tag, created)``.

    Idempotent: when ``name:version`` already holds the same weights, ONNX and bank bytes nothing
    is written and ``created`` is False; when its bytes differ the old entry is replaced.

    Args:
        name: The model's name (a model spec's ``name``; the demo's is ``resnet18-synthderm``).
        version: ``vanilla``, ``pclarc-band_aid``, …
        weights: The version checkpoint (``medaudit.models.corrections.io.save_version``).
        onnx: Its ONNX export.
        card_dir: Folder holding ``card.json`` and ``card.md``.
        bank_dir: The version's saved :class:`~models.xai.concepts.ConceptBank`.
        labels: Extra BentoML labels (strings).
        home: BentoML home; default ``$BENTOML_HOME``.
    """
    from medaudit.models.cards import ModelCard
    from medaudit.models.xai.concepts import ConceptBank

    bentoml = _bentoml()
    tag = f"{check_tag_part(name, 'model name')}:{check_tag_part(version, 'model version')}"
    w, o, cdir, bdir = Path(weights), Path(onnx), Path(card_dir), Path(bank_dir)
    for f in (w, o, *(cdir / c for c in CARD_FILES)):
        if not f.is_file():
            raise StoreError(f"cannot register {tag}: {f} does not exist")
    card = ModelCard.load(cdir)
    bank = ConceptBank.load(bdir)  # refuses a malformed bank before anything is stored
    bank.check_model(tag)
    meta = {
        "format": STORE_FORMAT,
        "arch": str(card.architecture.get("arch", "")),
        "version": version,
        "correction": str(card.correction.get("name", "")),
        "weights_sha256": sha256_file(w),
        "onnx_sha256": sha256_file(o),
        "bank_sha256": _bank_hashes(bdir),
        "bank_layer": bank.layer,
        "concepts": list(bank.concepts),
    }
    store = model_store(home)
    try:
        old = store.get(tag)
    except bentoml.exceptions.NotFound:
        old = None
    if old is not None:
        om = dict(old.info.metadata)
        if all(om.get(k) == meta[k] for k in ("weights_sha256", "onnx_sha256", "bank_sha256")):
            return tag, False
        store.delete(tag)
    with bentoml.models.create(
        tag,
        labels={"medaudit": "version", "correction": meta["correction"] or "none", **dict(labels or {})},
        metadata=meta,
        _model_store=store,
    ) as ref:
        dst = Path(ref.path)
        shutil.copyfile(w, dst / WEIGHTS_FILE)
        shutil.copyfile(o, dst / ONNX_FILE)
        for c in CARD_FILES:
            shutil.copyfile(cdir / c, dst / c)
        shutil.copytree(bdir, dst / BANK_DIR)
    return tag, True


def delete_version(tag: str, home: str | Path | None = None) -> bool:
    """Removes ``tag`` from the store (a build that failed takes back what it registered);
    returns whether it was there."""
    bentoml = _bentoml()
    try:
        model_store(home).delete(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True


# --------------------------------------------------------------------------------- load


def _get(tag: str, home: str | Path | None) -> Any:
    bentoml = _bentoml()
    store = model_store(home)
    try:
        return store.get(tag)
    except (bentoml.exceptions.NotFound, ValueError) as e:
        known = sorted(str(m.tag) for m in store.list())
        where = store_home(home) / "models"
        names = sorted({k.split(":", 1)[0] for k in known})
        asked = tag.split(":", 1)[0]
        hint = ""
        if known and asked not in names:  # a short version resolved under another model's name
            hint = (
                f"; the store holds model{'s' if len(names) > 1 else ''} {', '.join(names)}: name the "
                f"version in full ({names[0]}:<version>) or set MEDAUDIT_MODEL_NAME={names[0]}"
            )
        elif not known:
            hint = "; build versions into it with `medaudit build` (docs/commands.md)"
        raise StoreError(
            f"no model version {tag!r} in {where}; stored: {', '.join(known) or '(none)'}{hint}"
        ) from e


def verify_version(tag: str, home: str | Path | None = None) -> Path:
    """Checks every recorded sha256 of ``tag``; returns its directory or raises IntegrityError."""
    ref = _get(tag, home)
    meta = dict(ref.info.metadata)
    path = Path(ref.path)
    if meta.get("format") != STORE_FORMAT:
        raise StoreError(f"{tag} in {path} was not stored by medaudit (format {meta.get('format')!r})")
    for fname, key in ((WEIGHTS_FILE, "weights_sha256"), (ONNX_FILE, "onnx_sha256")):
        f = path / fname
        if not f.is_file():
            raise StoreError(f"model version {tag}: {f} is missing")
        actual = sha256_file(f)
        if actual != meta[key]:
            raise IntegrityError(tag, f, meta[key], actual)
    bank_dir = path / BANK_DIR
    recorded = dict(meta.get("bank_sha256") or {})
    found = _bank_hashes(bank_dir) if bank_dir.is_dir() else {}
    for rel in sorted(set(recorded) | set(found)):
        exp, act = recorded.get(rel, "(not recorded)"), found.get(rel, "(missing)")
        if exp != act:
            raise IntegrityError(tag, bank_dir / rel, exp, act)
    return path


def load_version(tag: str, home: str | Path | None = None) -> LoadedVersion:
    """Verifies and loads ``tag`` (``resnet18-synthderm:vanilla``; ``…:latest`` works too).

    Raises:
        StoreError: unknown tag or missing file (the message lists the stored versions).
        IntegrityError: a weights, ONNX or bank file whose sha256 differs from the recorded one.
    """
    from medaudit.models.cards import ModelCard
    from medaudit.models.corrections.io import load_version as load_checkpoint
    from medaudit.models.xai.concepts import ConceptBank

    path = verify_version(tag, home)
    full = str(_get(tag, home).tag)
    model, cfg, record = load_checkpoint(path / WEIGHTS_FILE)
    bank = ConceptBank.load(path / BANK_DIR)
    bank.check_model(full)
    card = ModelCard.load(path)
    return LoadedVersion(full, model, path / ONNX_FILE, bank, card, cfg, record, path)


def list_versions(name: str | None = None, home: str | Path | None = None) -> list[VersionInfo]:
    """Every stored medaudit version (of ``name``, if given), sorted by tag."""
    bentoml = _bentoml()
    store = model_store(home)
    try:
        refs = store.list(name) if name else store.list()
    except bentoml.exceptions.NotFound:
        return []
    out = []
    for ref in refs:
        meta = dict(ref.info.metadata)
        if meta.get("format") != STORE_FORMAT:
            continue
        out.append(
            VersionInfo(
                tag=str(ref.tag),
                name=ref.tag.name,
                version=str(ref.tag.version),
                arch=str(meta.get("arch", "")),
                created_at=ref.creation_time.isoformat(timespec="seconds"),
                weights_sha256=str(meta["weights_sha256"]),
                onnx_sha256=str(meta["onnx_sha256"]),
                path=Path(ref.path),
            )
        )
    return sorted(out, key=lambda v: v.tag)
