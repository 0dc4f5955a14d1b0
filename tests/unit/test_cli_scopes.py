"""``--cav-scope`` on ``medaudit build`` and ``medaudit audit``: class names in, class indices of the
data out, an unknown class named with the data's classes."""

from __future__ import annotations

import pytest
import typer

from medaudit.cli.audit_cmd import _parse_scopes
from medaudit.cli.build_cmd import parse_cav_scope

CLASSES = ("nevus", "melanoma", "bcc")


def test_build_takes_the_two_keywords_or_class_names() -> None:
    assert parse_cav_scope("artifact_class") == "artifact_class"
    assert parse_cav_scope(" all ") == "all"
    assert parse_cav_scope("nevus, bcc") == ("nevus", "bcc")


def test_audit_maps_each_concepts_classes_to_indices() -> None:
    assert _parse_scopes(["band_aid=nevus", "ruler=bcc,melanoma"], CLASSES) == {
        "band_aid": (0,),
        "ruler": (1, 2),
    }
    assert _parse_scopes([], CLASSES) == {}
    with pytest.raises(
        typer.BadParameter, match=r"unknown classes \['mel'\]; the data's: nevus, melanoma, bcc"
    ):
        _parse_scopes(["ruler=mel"], CLASSES)
    with pytest.raises(typer.BadParameter, match="NAME=VALUE"):
        _parse_scopes(["ruler"], CLASSES)
