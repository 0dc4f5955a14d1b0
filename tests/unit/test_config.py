"""Settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medaudit.models.errors import ConfigError
from medaudit.service import config
from medaudit.service.auth import Role, hash_key
from medaudit.service.config import (
    MAX_AUTO_AUDIT_WORKERS,
    Settings,
    audit_workers,
    unknown_variables,
    usable_cpus,
)
from medaudit.service.inputs import Limits

SALT = "s3"
DIGEST = hash_key("the-key", SALT)
AUTH = {"MEDAUDIT_API_KEYS": f"client:{DIGEST}", "MEDAUDIT_API_KEY_SALT": SALT}


def test_defaults_need_keys_or_auth_off() -> None:
    with pytest.raises(ConfigError, match="MEDAUDIT_AUTH is on but no keys"):
        Settings.from_env({})
    s = Settings.from_env({"MEDAUDIT_AUTH": "off"})
    assert s.versions == ("vanilla",) and s.router().weights == {"vanilla": 1.0}
    assert s.limits == Limits() and s.redis_url is None and s.key_store() is None
    assert s.open_health and s.open_metrics and s.flag_fpr is None
    assert s.predict_threads is None and s.audit_threads is None  # the libraries' defaults
    assert s.audit_workers == min(usable_cpus(), MAX_AUTO_AUDIT_WORKERS)


def test_full_environment() -> None:
    env = {
        **AUTH,
        "MEDAUDIT_VERSIONS": "vanilla, pclarc-band_aid ,rrclarc-band_aid",
        "MEDAUDIT_AB_WEIGHTS": "vanilla=3,pclarc-band_aid=1",
        "MEDAUDIT_SHADOW_VERSION": "rrclarc-band_aid",
        "MEDAUDIT_FLAG_FPR": "0.01",
        "MEDAUDIT_MAX_BYTES": "1_000_000",
        "MEDAUDIT_MAX_PIXELS": "4000000",
        "MEDAUDIT_MIN_IMAGE_SIDE": "16",
        "REDIS_URL": "redis://localhost:6379/0",
        "MEDAUDIT_OPEN_METRICS": "no",
        "MEDAUDIT_PREDICT_THREADS": "1",
        "MEDAUDIT_AUDIT_THREADS": "2",
    }
    s = Settings.from_env(env)
    assert s.predict_threads == 1 and s.audit_threads == 2
    assert s.versions == ("vanilla", "pclarc-band_aid", "rrclarc-band_aid")
    r = s.router()
    assert r.weights == {"pclarc-band_aid": 0.25, "rrclarc-band_aid": 0.0, "vanilla": 0.75}
    assert r.shadow == "rrclarc-band_aid" and s.flag_fpr == 0.01
    assert s.limits == Limits(max_bytes=1_000_000, max_pixels=4_000_000, min_side=16)
    assert s.redis_url == "redis://localhost:6379/0" and not s.open_metrics
    store = s.key_store()
    assert store is not None and store.authenticate("Bearer the-key").role is Role.CLIENT
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.auth_enabled = False  # type: ignore[misc]


def test_medaudit_redis_url_wins_and_empty_means_unset() -> None:
    s = Settings.from_env(
        {
            "MEDAUDIT_AUTH": "off",
            "MEDAUDIT_REDIS_URL": "rediss://h:1",
            "REDIS_URL": "redis://x",
            "MEDAUDIT_SHADOW_VERSION": "",
        }
    )
    assert s.redis_url == "rediss://h:1" and s.shadow_version is None


def test_keys_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# reviewers\nreviewer:{hash_key('r', SALT)}\n")
    s = Settings.from_env({**AUTH, "MEDAUDIT_API_KEYS_FILE": str(f)})
    assert [e.role for e in s.api_keys] == [Role.CLIENT, Role.REVIEWER]
    with pytest.raises(ConfigError, match="MEDAUDIT_API_KEYS_FILE='/nonexistent' cannot be read"):
        Settings.from_env({**AUTH, "MEDAUDIT_API_KEYS_FILE": "/nonexistent"})


def test_repr_hides_keys_and_salt() -> None:
    text = repr(Settings.from_env(AUTH))
    assert DIGEST not in text and SALT not in text


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"MEDAUDIT_MAX_BYTES": "lots"}, "MEDAUDIT_MAX_BYTES must be a positive integer, got 'lots'"),
        ({"MEDAUDIT_MAX_PIXELS": "0"}, "MEDAUDIT_MAX_PIXELS must be a positive integer"),
        ({"MEDAUDIT_PREDICT_THREADS": "0"}, "MEDAUDIT_PREDICT_THREADS must be a positive integer"),
        ({"MEDAUDIT_AUDIT_THREADS": "two"}, "MEDAUDIT_AUDIT_THREADS must be a positive integer"),
        (
            {"MEDAUDIT_AUDIT_WORKERS": "0"},
            "MEDAUDIT_AUDIT_WORKERS must be a positive integer or 'auto', got '0'",
        ),
        ({"MEDAUDIT_AUDIT_WORKERS": "many"}, "MEDAUDIT_AUDIT_WORKERS must be a positive integer or 'auto'"),
        ({"MEDAUDIT_AUTH": "maybe"}, "MEDAUDIT_AUTH must be one of on/off"),
        ({"MEDAUDIT_FLAG_FPR": "1.5"}, r"MEDAUDIT_FLAG_FPR must be in \(0, 1\)"),
        ({"MEDAUDIT_FLAG_FPR": "low"}, "MEDAUDIT_FLAG_FPR must be a number"),
        ({"MEDAUDIT_FLAG_SHARE": "1.5"}, r"MEDAUDIT_FLAG_SHARE must be in \[0, 1\], got 1.5"),
        ({"MEDAUDIT_FLAG_SHARE": "nan"}, r"MEDAUDIT_FLAG_SHARE must be in \[0, 1\]"),
        ({"MEDAUDIT_FLAG_SHARE": "most"}, "MEDAUDIT_FLAG_SHARE must be a number, got 'most'"),
        ({"MEDAUDIT_VERSIONS": "a,a"}, "lists a version twice"),
        ({"MEDAUDIT_VERSIONS": "a b"}, "'a b' is not a valid version name"),
        ({"MEDAUDIT_AB_WEIGHTS": "nope=1"}, "AB_WEIGHTS names 'nope', which is not served; served: vanilla"),
        ({"MEDAUDIT_AB_WEIGHTS": "vanilla"}, "'vanilla' is not 'version=weight'"),
        ({"MEDAUDIT_AB_WEIGHTS": "vanilla=-1"}, "finite and >= 0"),
        ({"MEDAUDIT_AB_WEIGHTS": "vanilla=0"}, "sum to 0"),
        ({"MEDAUDIT_SHADOW_VERSION": "pclarc"}, "SHADOW_VERSION='pclarc' is not served"),
        ({"REDIS_URL": "http://user:pw@h"}, r"must start with redis://.*'http://\*\*\*@h'"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as ei:
        Settings.from_env({"MEDAUDIT_AUTH": "off", **env})
    assert "pw" not in str(ei.value)


def test_auth_on_needs_salt() -> None:
    with pytest.raises(ConfigError, match="MEDAUDIT_API_KEY_SALT is empty"):
        Settings.from_env({"MEDAUDIT_API_KEYS": f"client:{DIGEST}"})


def test_flag_share_seeds_the_flag_policy() -> None:
    """MEDAUDIT_FLAG_SHARE is the policy's default share (0.2 unset); MEDAUDIT_FLAG_POLICY wins."""
    assert Settings.from_env({"MEDAUDIT_AUTH": "off"}).policy().default.share == 0.2
    s = Settings.from_env({"MEDAUDIT_AUTH": "off", "MEDAUDIT_FLAG_SHARE": "0.35"})
    assert s.flag_share == 0.35 and s.policy().default.share == 0.35
    both = {"MEDAUDIT_AUTH": "off", "MEDAUDIT_FLAG_SHARE": "0.35", "MEDAUDIT_FLAG_POLICY": "ruler:share=0.1"}
    p = Settings.from_env(both).policy()
    assert p.default.share == 0.35 and p.for_concept("ruler").share == 0.1
    assert "MEDAUDIT_FLAG_SHARE" not in unknown_variables({"MEDAUDIT_FLAG_SHARE": "0.3"})


def test_unknown_variables_catch_typos() -> None:
    env = {"MEDAUDIT_MAX_BYTE": "1", "MEDAUDIT_MAX_BYTES": "1", "MEDAUDIT_HOME": "/x", "PATH": "/bin"}
    assert unknown_variables(env) == ["MEDAUDIT_HOME", "MEDAUDIT_MAX_BYTE"]
    assert unknown_variables(env, frozenset({"MEDAUDIT_HOME"})) == ["MEDAUDIT_MAX_BYTE"]


def test_import_is_light() -> None:
    """No transport and no torch behind the service's groundwork modules."""
    import subprocess
    import sys

    code = (
        "import sys, service.config, service.inputs, service.routing, service.auth, service.errors; "
        "bad = [m for m in ('torch', 'bentoml', 'redis', 'starlette', 'pydicom') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_audit_workers_default_to_one_per_usable_core_capped(monkeypatch) -> None:
    """Unset or ``auto``: one auditor process per usable core, at most MAX_AUTO_AUDIT_WORKERS; a
    number is taken as it is. (No GPU: on one, ``auto`` is one process; see below.)"""
    monkeypatch.setattr(config, "_cuda_devices", lambda: 0)
    for cores, expected in ((1, 1), (2, 2), (64, MAX_AUTO_AUDIT_WORKERS)):
        monkeypatch.setattr(config, "usable_cpus", lambda n=cores: n)
        assert audit_workers({}) == audit_workers({"MEDAUDIT_AUDIT_WORKERS": " Auto "}) == expected
    assert audit_workers({"MEDAUDIT_AUDIT_WORKERS": "3"}) == 3
    assert Settings.from_env({"MEDAUDIT_AUTH": "off", "MEDAUDIT_AUDIT_WORKERS": "5"}).audit_workers == 5


def test_auditor_threads_share_the_cores_out_among_workers(monkeypatch) -> None:
    """Several workers and no MEDAUDIT_AUDIT_THREADS: cores // workers each (at least 1); one
    worker: torch's own default (None); MEDAUDIT_AUDIT_THREADS always wins."""
    monkeypatch.setattr(config, "usable_cpus", lambda: 8)
    off = {"MEDAUDIT_AUTH": "off"}
    assert Settings.from_env({**off, "MEDAUDIT_AUDIT_WORKERS": "4"}).auditor_threads() == 2
    assert Settings.from_env({**off, "MEDAUDIT_AUDIT_WORKERS": "16"}).auditor_threads() == 1
    assert Settings.from_env({**off, "MEDAUDIT_AUDIT_WORKERS": "1"}).auditor_threads() is None
    both = {**off, "MEDAUDIT_AUDIT_WORKERS": "4", "MEDAUDIT_AUDIT_THREADS": "3"}
    assert Settings.from_env(both).auditor_threads() == 3


def test_usable_cpus_reads_a_cgroup_quota_below_the_affinity_mask(tmp_path: Path) -> None:
    """A container's CPU limit is a cgroup v2 quota (cpu.max), rounded up to whole cores; "max",
    a missing file or a malformed one leave the affinity mask."""
    import os

    mask = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert usable_cpus(cpu_max) == mask  # no file
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == mask
    cpu_max.write_text("50000 100000\n")  # half a core: still one
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text(f"{(mask + 8) * 100000} 100000\n")  # a quota above the mask: the mask
    assert usable_cpus(cpu_max) == mask
    if mask >= 2:
        cpu_max.write_text("150000 100000\n")
        assert usable_cpus(cpu_max) == 2
    cpu_max.write_text("garbage\n")
    assert usable_cpus(cpu_max) == mask


@pytest.mark.parametrize(
    ("value", "gpus", "expected"),
    [
        (None, 0, "cpu"),
        (None, 2, "cuda:0"),
        ("auto", 0, "cpu"),
        (" AUTO ", 1, "cuda:0"),
        ("cpu", 2, "cpu"),
        ("cuda", 1, "cuda:0"),
        ("cuda:1", 2, "cuda:1"),
    ],
)
def test_audit_device_resolves_auto_and_explicit_choices(value, gpus, expected) -> None:
    env = {} if value is None else {"MEDAUDIT_AUDIT_DEVICE": value}
    assert config.audit_device(env, cuda_devices=gpus) == expected


@pytest.mark.parametrize(
    ("value", "gpus", "match"),
    [
        ("cuda", 0, "sees no GPU"),
        ("cuda:2", 2, "sees 2 GPU"),
        ("gpu", 1, "auto, cpu, cuda or cuda:N"),
        ("cuda:-1", 1, "auto, cpu, cuda or cuda:N"),
    ],
)
def test_audit_device_refuses_a_gpu_that_is_not_there(value, gpus, match) -> None:
    """An explicit GPU that is missing is a start-time error naming the variable, never a silent
    fallback to the CPU."""
    with pytest.raises(ConfigError, match=f"MEDAUDIT_AUDIT_DEVICE.*{match}"):
        config.audit_device({"MEDAUDIT_AUDIT_DEVICE": value}, cuda_devices=gpus)


def test_audit_device_on_this_machine_and_in_settings() -> None:
    """Read from torch itself (no injected GPU count): auto is the GPU exactly when torch sees one."""
    import torch

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert Settings.from_env({"MEDAUDIT_AUTH": "off"}).audit_device == expected
    assert Settings.from_env({"MEDAUDIT_AUTH": "off", "MEDAUDIT_AUDIT_DEVICE": "cpu"}).audit_device == "cpu"
    assert "MEDAUDIT_AUDIT_DEVICE" not in unknown_variables({"MEDAUDIT_AUDIT_DEVICE": "cpu"})


def test_auto_audit_workers_is_one_process_on_a_gpu(monkeypatch) -> None:
    """The batch fills a GPU, not extra processes (each would hold a CUDA context and the models);
    an explicit count still wins, and an explicit CPU device keeps one process per core."""
    monkeypatch.setattr(config, "usable_cpus", lambda: 8)
    monkeypatch.setattr(config, "_cuda_devices", lambda: 1)
    assert audit_workers({}) == 1
    assert audit_workers({"MEDAUDIT_AUDIT_WORKERS": "3"}) == 3
    assert audit_workers({"MEDAUDIT_AUDIT_DEVICE": "cpu"}) == min(8, MAX_AUTO_AUDIT_WORKERS)
