"""Typed service settings, built once at start from the environment and passed down.

Nothing here reads the environment at import: :meth:`Settings.from_env` takes a mapping (pass
``os.environ`` at start, a dict in tests). Every bad value is a :class:`medaudit.models.errors.ConfigError`
that names the variable, the value (never a secret) and what is valid.

Variables (all optional except where auth is on):

=================================  ==========================================================
``MEDAUDIT_VERSIONS``              served versions, comma-separated (default ``vanilla``)
``MEDAUDIT_MODEL_NAME``            store name of versions given without one (default
                                   ``resnet18-synthderm``): ``vanilla`` is ``<name>:vanilla``
``MEDAUDIT_AB_WEIGHTS``            ``version=weight,…`` (default: all weight on the first)
``MEDAUDIT_SHADOW_VERSION``        a served version that shadows every request
``MEDAUDIT_AB_SALT``               mixed into the A/B hash; change to reshuffle subjects
``MEDAUDIT_PREDICT_BACKEND``       ``onnx`` (default: ONNX Runtime) or ``torch`` (eager; a baseline)
``MEDAUDIT_PREDICT_THREADS``       intra-op threads of the /predict model (default: one per core)
``MEDAUDIT_AUDIT_WORKERS``         auditor (LRP) processes: a number or ``auto`` (default: one per
                                   usable core, at most 4; see :func:`audit_workers`)
``MEDAUDIT_AUDIT_THREADS``         torch threads of each auditor process (default: the usable
                                   cores shared out among the workers)
``MEDAUDIT_AUDIT_DEVICE``          where the auditor runs LRP: ``auto`` (default: the GPU when
                                   torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``
``MEDAUDIT_FLAG_FPR``              presence false-positive rate, in (0, 1): the rate at which a
                                   clean image sets off any concept of a bank (default: each
                                   concept bank's own target FPR)
``MEDAUDIT_FLAG_SHARE``            relevance share above which a present concept flags, in [0, 1]
                                   (default 0.2): the flag policy's default ``share`` unless
                                   ``MEDAUDIT_FLAG_POLICY`` sets one
``MEDAUDIT_PREDICT_DETAIL``        what ``/predict`` answers when the request names no ``detail``:
                                   ``prediction`` (default), ``scores`` (screened: concept scores
                                   and flag, :mod:`~medaudit.service.screening`) or ``full`` (an audit)
``MEDAUDIT_SCREEN_HEATMAPS``       ``flagged`` (default): a screened request that flags gets its
                                   heatmap and masks in the same request; ``off``: never
``MEDAUDIT_SCREEN_SAMPLE_RATE``    share of screened requests that get the heatmap anyway, for
                                   monitoring, in [0, 1] (default 0)
``MEDAUDIT_MAX_BYTES``             largest accepted body, bytes (default 32 MiB)
``MEDAUDIT_MAX_PIXELS``            largest accepted width×height (default 40 000 000)
``MEDAUDIT_MIN_IMAGE_SIDE``        smallest accepted side, px (default 1: tiny images are upscaled)
``MEDAUDIT_REDIS_URL``/``REDIS_URL``  redis://, rediss:// or unix:// URL (default: none = embedded)
``MEDAUDIT_FLAGS``                 on/off: publish flagged audits to Redis (default on)
``MEDAUDIT_AUTH``                  on/off (default on; on with no keys is an error)
``MEDAUDIT_API_KEYS``              ``role:sha256hex,…`` (see :mod:`medaudit.service.auth`)
``MEDAUDIT_API_KEYS_FILE``         a file of such entries, one per line
``MEDAUDIT_API_KEY_SALT``          the per-deployment salt the digests were made with
``MEDAUDIT_OPEN_HEALTH``           health endpoints without a key (default on)
``MEDAUDIT_OPEN_METRICS``          ``/metrics`` without a key (default on: scraped in-cluster)
``MEDAUDIT_UI_REFIT_DIR``          where the reviewer workbench's refits write their banks, cards
                                   and output (default: ``medaudit-refits/`` in the temp folder)
``MEDAUDIT_FLAG_*``                the flag pipeline (:mod:`medaudit.service.flags.settings`), in
                                   ``Settings.flags``
=================================  ==========================================================
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

from medaudit.models.errors import ConfigError
from medaudit.service.auth import KeyEntry, KeyStore, parse_key_spec
from medaudit.service.endpoints import PREDICT_DETAILS
from medaudit.service.envvars import choice, positive_int, unit_float
from medaudit.service.flags.policy import PolicyConfig
from medaudit.service.flags.settings import NAMES as FLAG_NAMES
from medaudit.service.flags.settings import FlagSettings
from medaudit.service.inputs import Limits
from medaudit.service.routing import Router

PREFIX = "MEDAUDIT_"
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")
#: A BentoML tag's name part (service.store.check_tag_part), which a model name must be.
_MODEL_NAME = re.compile(r"^[a-z0-9]([-._a-z0-9]{0,61}[a-z0-9])?$")
#: The demo's model name: the store name of a served version given without one.
DEFAULT_MODEL_NAME = "resnet18-synthderm"


def version_tag(version: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    """The store tag of a served version: ``vanilla`` -> ``<model_name>:vanilla``; a full
    ``name:version`` is kept."""
    return version if ":" in version else f"{model_name}:{version}"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """Everything the service decides at start. Frozen: built once, passed down, never mutated."""

    versions: tuple[str, ...] = ("vanilla",)
    #: Store name of the versions given without one (a model spec's ``name`` for a hospital store).
    model_name: str = DEFAULT_MODEL_NAME
    ab_weights: tuple[tuple[str, float], ...] = (("vanilla", 1.0),)
    shadow_version: str | None = None
    ab_salt: str = ""
    flag_fpr: float | None = None
    flag_share: float = 0.2
    #: Screening (:mod:`medaudit.service.screening`): what ``/predict`` answers by default, whether
    #: a flagged screen gets its heatmap, and the share of screens that get one anyway.
    predict_detail: str = "prediction"
    screen_heatmaps: bool = True
    screen_sample_rate: float = 0.0
    predict_backend: str = "onnx"
    #: Intra-op threads of the /predict model (ONNX Runtime or torch) and of the auditor's torch;
    #: ``None``: the library's default (one per core). Each runs in its own process, beside the
    #: entry service, so on a small machine fewer threads than cores can serve more.
    predict_threads: int | None = None
    audit_threads: int | None = None
    #: LRP processes of the auditor (service.audit_pool); see :func:`audit_workers`.
    audit_workers: int = 1
    #: Torch device of the auditor's LRP engine (``cpu``, ``cuda:N``); see :func:`audit_device`.
    audit_device: str = "cpu"
    limits: Limits = field(default_factory=Limits)
    redis_url: str | None = None
    flags_enabled: bool = True
    auth_enabled: bool = True
    api_keys: tuple[KeyEntry, ...] = field(default=(), repr=False)
    api_key_salt: str = field(default="", repr=False)
    open_health: bool = True
    open_metrics: bool = True
    #: Output folder of the reviewer workbench's refits (service/ui/refit.py); None: a temp folder.
    ui_refit_dir: str | None = None
    flags: FlagSettings = field(default_factory=FlagSettings)

    def __post_init__(self) -> None:
        if not self.versions:
            raise ConfigError(f"{PREFIX}VERSIONS is empty; name at least one served version")
        for v in self.versions:
            if not _VERSION.match(v):
                raise ConfigError(
                    f"{PREFIX}VERSIONS: {v!r} is not a valid version name (letters, digits, . _ : + -)"
                )
        if not _MODEL_NAME.match(self.model_name):
            raise ConfigError(
                f"{PREFIX}MODEL_NAME={self.model_name!r} is not a store model name: lowercase letters, "
                "digits, '-', '_' or '.', starting and ending with a letter or digit, at most 63 characters"
            )
        if len(set(self.versions)) != len(self.versions):
            raise ConfigError(f"{PREFIX}VERSIONS lists a version twice: {', '.join(self.versions)}")
        for v, _ in self.ab_weights:
            if v not in self.versions:
                raise ConfigError(
                    f"{PREFIX}AB_WEIGHTS names {v!r}, which is not served; served: {', '.join(self.versions)}"
                )
        if self.shadow_version is not None and self.shadow_version not in self.versions:
            raise ConfigError(
                f"{PREFIX}SHADOW_VERSION={self.shadow_version!r} is not served; "
                f"served: {', '.join(self.versions)}"
            )
        if self.predict_backend not in ("onnx", "torch"):
            raise ConfigError(
                f"{PREFIX}PREDICT_BACKEND must be 'onnx' or 'torch', got {self.predict_backend!r}"
            )
        if self.flag_fpr is not None and not 0.0 < self.flag_fpr < 1.0:
            raise ConfigError(f"{PREFIX}FLAG_FPR must be in (0, 1), got {self.flag_fpr!r}")
        if not 0.0 <= self.flag_share <= 1.0:
            raise ConfigError(f"{PREFIX}FLAG_SHARE must be in [0, 1], got {self.flag_share!r}")
        if self.predict_detail not in PREDICT_DETAILS:
            raise ConfigError(
                f"{PREFIX}PREDICT_DETAIL must be one of {', '.join(PREDICT_DETAILS)}; "
                f"got {self.predict_detail!r}"
            )
        if not 0.0 <= self.screen_sample_rate <= 1.0:
            raise ConfigError(
                f"{PREFIX}SCREEN_SAMPLE_RATE must be in [0, 1], got {self.screen_sample_rate!r}"
            )
        if self.redis_url is not None and not re.match(r"^(redis|rediss|unix)://", self.redis_url):
            raise ConfigError(
                f"{PREFIX}REDIS_URL must start with redis://, rediss:// or unix://, got "
                f"{_redact_url(self.redis_url)!r}"
            )
        if self.auth_enabled:
            if not self.api_keys:
                raise ConfigError(
                    f"{PREFIX}AUTH is on but no keys are configured: set {PREFIX}API_KEYS or "
                    f"{PREFIX}API_KEYS_FILE (role:sha256hex entries), or {PREFIX}AUTH=off"
                )
            if not self.api_key_salt:
                raise ConfigError(f"{PREFIX}AUTH is on but {PREFIX}API_KEY_SALT is empty")
        self.router()  # validates weights now rather than on the first request

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping (``os.environ`` at service start).

        Raises:
            ConfigError: A value that cannot be parsed or is out of range, naming the variable.
        """
        env = {k: v for k, v in environ.items() if v.strip() != ""}  # empty = unset
        versions = tuple(_split(env.get(PREFIX + "VERSIONS", "vanilla")))
        device = audit_device(env)
        weights_s = env.get(PREFIX + "AB_WEIGHTS")
        weights = _parse_weights(weights_s) if weights_s else ((versions[0], 1.0),) if versions else ()
        keys: tuple[KeyEntry, ...] = ()
        if PREFIX + "API_KEYS" in env:
            keys += parse_key_spec(env[PREFIX + "API_KEYS"], PREFIX + "API_KEYS")
        if PREFIX + "API_KEYS_FILE" in env:
            path = Path(env[PREFIX + "API_KEYS_FILE"])
            try:
                text = path.read_text()
            except OSError as e:
                raise ConfigError(f"{PREFIX}API_KEYS_FILE={str(path)!r} cannot be read: {e.strerror}") from e
            keys += parse_key_spec(text, f"{PREFIX}API_KEYS_FILE ({path})")
        return cls(
            versions=versions,
            model_name=env.get(PREFIX + "MODEL_NAME", DEFAULT_MODEL_NAME).strip(),
            ab_weights=weights,
            shadow_version=env.get(PREFIX + "SHADOW_VERSION"),
            ab_salt=env.get(PREFIX + "AB_SALT", ""),
            flag_fpr=_float(env, PREFIX + "FLAG_FPR"),
            flag_share=_float(env, PREFIX + "FLAG_SHARE", cls.flag_share),
            predict_detail=choice(env, PREFIX + "PREDICT_DETAIL", PREDICT_DETAILS, cls.predict_detail),
            screen_heatmaps=choice(env, PREFIX + "SCREEN_HEATMAPS", ("flagged", "off"), "flagged")
            == "flagged",
            screen_sample_rate=unit_float(env, PREFIX + "SCREEN_SAMPLE_RATE", cls.screen_sample_rate),
            predict_backend=env.get(PREFIX + "PREDICT_BACKEND", "onnx").strip().lower(),
            predict_threads=_optional_positive_int(env, PREFIX + "PREDICT_THREADS"),
            audit_threads=_optional_positive_int(env, PREFIX + "AUDIT_THREADS"),
            audit_workers=audit_workers(env, device),
            audit_device=device,
            limits=Limits(
                max_bytes=positive_int(env, PREFIX + "MAX_BYTES", Limits.max_bytes),
                max_pixels=positive_int(env, PREFIX + "MAX_PIXELS", Limits.max_pixels),
                min_side=positive_int(env, PREFIX + "MIN_IMAGE_SIDE", Limits.min_side),
            ),
            redis_url=env.get(PREFIX + "REDIS_URL", env.get("REDIS_URL")),
            flags_enabled=_bool(env, PREFIX + "FLAGS", True),
            auth_enabled=_bool(env, PREFIX + "AUTH", True),
            api_keys=keys,
            api_key_salt=env.get(PREFIX + "API_KEY_SALT", ""),
            open_health=_bool(env, PREFIX + "OPEN_HEALTH", True),
            open_metrics=_bool(env, PREFIX + "OPEN_METRICS", True),
            ui_refit_dir=env.get(PREFIX + "UI_REFIT_DIR") or None,
            flags=FlagSettings.from_env(env),
        )

    def tag(self, version: str) -> str:
        """The store tag of served ``version`` (:func:`version_tag` with :attr:`model_name`)."""
        return version_tag(version, self.model_name)

    def auditor_threads(self) -> int | None:
        """Torch threads of one auditor process: ``MEDAUDIT_AUDIT_THREADS`` if set; else, with
        several workers, the usable cores shared out among them; else ``None`` (torch's default)."""
        if self.audit_threads is not None:
            return self.audit_threads
        if self.audit_workers > 1:
            return max(1, usable_cpus() // self.audit_workers)
        return None

    def router(self) -> Router:
        """The A/B router these settings describe (served versions absent from the weights get 0)."""
        weights = {v: 0.0 for v in self.versions} | dict(self.ab_weights)
        return Router(weights, self.shadow_version, salt=self.ab_salt)

    def policy(self) -> PolicyConfig:
        """The flag policy: ``MEDAUDIT_FLAG_POLICY`` over a default share of ``flag_share``."""
        return self.flags.policy(self.flag_share)

    def key_store(self) -> KeyStore | None:
        """The key store, or ``None`` when auth is off (callers then use ``auth.ANONYMOUS``)."""
        return KeyStore(self.api_keys, self.api_key_salt) if self.auth_enabled else None


#: Most auditor processes ``auto`` starts: each holds torch and every served version's model
#: (about 1.5 GiB unique memory each with three versions, their LRP kernels prepacked), and LRP
#: gains little past a few processes on a shared host.
MAX_AUTO_AUDIT_WORKERS = 4
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its affinity mask, narrowed by a cgroup v2 CPU quota.

    A container's CPU limit (Kubernetes ``limits.cpu``) is a quota, not an affinity mask: the
    mask still lists every core of the node, so the quota (``cpu.max``: ``"400000 100000"`` is
    4 cores, rounded up; ``"max …"`` is none) has to be read too.
    """
    try:
        n = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 here, or an unreadable entry: the mask alone
    return n


def audit_workers(environ: Mapping[str, str], device: str | None = None) -> int:
    """LRP processes of the auditor from ``MEDAUDIT_AUDIT_WORKERS``: a positive number, or
    ``auto`` / unset for one per usable core, at most :data:`MAX_AUTO_AUDIT_WORKERS`.

    Why processes and not threads: torch's LRP backward scales poorly over threads on CPU (batch 8
    on 2 cores: 23.3 ms per image with 2 threads against 31.2 with 1, so the second core adds only
    34 %), while single-threaded processes each use a whole core. Served on 2 cores (AMD EPYC,
    benchmarks/serve.py), one two-threaded auditor answered 33.4-35.1 /audit req/s (2 runs) and
    two single-threaded ones 35.9-41.0, median 38.4 (7 runs). They are
    processes the auditor's one BentoML worker starts and feeds from its queue
    (:mod:`medaudit.service.audit_pool`; with one, LRP runs in the worker itself), not BentoML workers:
    those share one socket and traffic piled onto one of them. Read when the auditor starts: a
    start-time setting. Set it here, not through ``BENTOML_CONFIG_OPTIONS``: the thread split
    (:meth:`Settings.auditor_threads`) reads it from here.

    With the auditor on a GPU (:func:`audit_device`), ``auto`` is one process: the batch, not the
    process count, fills a GPU, and each process would hold its own CUDA context and models.
    ``device``: the auditor's device when the caller has already resolved it (else read here).
    """
    name = PREFIX + "AUDIT_WORKERS"
    raw = environ.get(name, "").strip().lower().replace("_", "")
    if raw in ("", "auto"):
        if (device or audit_device(environ)) != "cpu":
            return 1
        return min(usable_cpus(), MAX_AUTO_AUDIT_WORKERS)
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise ConfigError(f"{name} must be a positive integer or 'auto', got {environ[name]!r}")


def audit_device(environ: Mapping[str, str], cuda_devices: int | None = None) -> str:
    """The auditor's torch device from ``MEDAUDIT_AUDIT_DEVICE``: ``"cpu"`` or ``"cuda:N"``.

    ``auto`` (or unset) takes the first GPU when torch sees one, else the CPU; ``cuda`` is
    ``cuda:0``. Asking for a GPU that is not there is a start-time error, not a silent CPU
    fallback: an operator who set it expects the GPU's throughput. ``cuda_devices`` overrides
    ``torch.cuda.device_count()`` (tests).
    """
    name = PREFIX + "AUDIT_DEVICE"
    raw = environ.get(name, "").strip().lower()
    if raw == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", raw)
    if raw not in ("", "auto") and not m:
        raise ConfigError(f"{name} must be auto, cpu, cuda or cuda:N, got {environ[name]!r}")
    if cuda_devices is None:
        cuda_devices = _cuda_devices()
    if not m:  # auto
        return "cuda:0" if cuda_devices else "cpu"
    index = int(m.group(1) or 0)
    if index >= cuda_devices:
        seen = f"torch sees {cuda_devices} GPU(s)" if cuda_devices else "torch sees no GPU"
        raise ConfigError(f"{name}={environ[name]!r} but {seen}; use auto or cpu")
    return f"cuda:{index}"


def _cuda_devices() -> int:
    """GPUs torch can use here (imports torch: called at service start, not at import)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def unknown_variables(environ: Mapping[str, str], known: frozenset[str] | None = None) -> list[str]:
    """``MEDAUDIT_*`` variables that these settings do not read: log them at start to catch typos.

    Other components may read their own ``MEDAUDIT_*`` variables; pass them in ``known``.
    """
    mine = {PREFIX + n for n in _NAMES}
    return sorted(k for k in environ if k.startswith(PREFIX) and k not in mine and k not in (known or ()))


_NAMES = (
    "VERSIONS",
    "MODEL_NAME",
    "AB_WEIGHTS",
    "SHADOW_VERSION",
    "AB_SALT",
    "FLAG_FPR",
    "FLAG_SHARE",
    "PREDICT_DETAIL",
    "SCREEN_HEATMAPS",
    "SCREEN_SAMPLE_RATE",
    "PREDICT_BACKEND",
    "PREDICT_THREADS",
    "AUDIT_THREADS",
    "AUDIT_WORKERS",
    "AUDIT_DEVICE",
    "MAX_BYTES",
    "MAX_PIXELS",
    "MIN_IMAGE_SIDE",
    "REDIS_URL",
    "FLAGS",
    "AUTH",
    "API_KEYS",
    "API_KEYS_FILE",
    "API_KEY_SALT",
    "OPEN_HEALTH",
    "OPEN_METRICS",
    "UI_REFIT_DIR",
    *FLAG_NAMES,
)


def _optional_positive_int(env: Mapping[str, str], name: str) -> int | None:
    return positive_int(env, name, 1) if name in env else None


def _split(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _parse_weights(s: str) -> tuple[tuple[str, float], ...]:
    out: list[tuple[str, float]] = []
    for item in _split(s):
        v, sep, w = item.partition("=")
        if not sep or not v.strip():
            raise ConfigError(f"{PREFIX}AB_WEIGHTS: {item!r} is not 'version=weight'")
        try:
            wf = float(w)
        except ValueError:
            raise ConfigError(f"{PREFIX}AB_WEIGHTS: weight of {v.strip()!r} is {w!r}, not a number") from None
        if not math.isfinite(wf) or wf < 0:
            raise ConfigError(
                f"{PREFIX}AB_WEIGHTS: weight of {v.strip()!r} must be finite and >= 0, got {w!r}"
            )
        out.append((v.strip(), wf))
    names = [v for v, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{PREFIX}AB_WEIGHTS names a version twice: {s!r}")
    return tuple(out)


@overload
def _float(env: Mapping[str, str], name: str) -> float | None: ...
@overload
def _float(env: Mapping[str, str], name: str, default: float) -> float: ...
def _float(env: Mapping[str, str], name: str, default: float | None = None) -> float | None:
    if name not in env:
        return default
    try:
        return float(env[name])
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {env[name]!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    if name not in env:
        return default
    s = env[name].strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ConfigError(f"{name} must be one of on/off, true/false, 1/0, yes/no; got {env[name]!r}")


def _redact_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)
