"""Served versions are named by the model: ``MEDAUDIT_MODEL_NAME`` is the store name of the versions
given without one, so a hospital's store is served with short names; the demo's keeps its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from medaudit.models.errors import ConfigError
from medaudit.service.config import DEFAULT_MODEL_NAME, Settings, version_tag

OFF = {"MEDAUDIT_AUTH": "off"}


def test_short_versions_resolve_under_the_model_name() -> None:
    assert DEFAULT_MODEL_NAME == "resnet18-synthderm"  # make demo's store keeps its tags
    assert Settings.from_env(OFF).tag("vanilla") == "resnet18-synthderm:vanilla"
    s = Settings.from_env(
        {**OFF, "MEDAUDIT_MODEL_NAME": "hospital-derm", "MEDAUDIT_VERSIONS": "vanilla,x:v2"}
    )
    assert [s.tag(v) for v in s.versions] == ["hospital-derm:vanilla", "x:v2"]  # a full tag is kept
    assert version_tag("rrr-band_aid", "derm3") == "derm3:rrr-band_aid"
    with pytest.raises(ConfigError, match="MEDAUDIT_MODEL_NAME='Derm 3' is not a store model name"):
        Settings.from_env({**OFF, "MEDAUDIT_MODEL_NAME": "Derm 3"})


def test_a_version_asked_under_another_name_is_refused_with_the_name_the_store_holds(
    tiny_store: Path,
) -> None:
    from medaudit.service.errors import StoreError
    from medaudit.service.store import load_version

    with pytest.raises(StoreError) as e:
        load_version("derm3:vanilla", home=tiny_store)
    msg = str(e.value)
    assert "stored: resnet18-synthderm:pclarc-band_aid, resnet18-synthderm:vanilla" in msg
    assert "set MEDAUDIT_MODEL_NAME=resnet18-synthderm" in msg
    with pytest.raises(StoreError, match="build versions into it with `medaudit build`"):
        load_version("derm3:vanilla", home=tiny_store.parent / "empty")
