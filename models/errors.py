"""One domain error tree for the ML side. Messages name the bad value and the valid choices."""

from __future__ import annotations


class MedauditError(Exception):
    """Base of every error medaudit raises on purpose."""


class UnknownModelError(MedauditError, KeyError):
    """A model or architecture name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(MedauditError):
    """A checkpoint that is missing, unreadable or does not fit the architecture."""


class DatasetError(MedauditError):
    """A dataset path, CSV, column or image that cannot be used."""


class ConfigError(MedauditError, ValueError):
    """A configuration value out of its valid range."""


class InvalidArrayError(MedauditError, ValueError):
    """An array handed to an explanation function with the wrong shape, dtype or values."""


class ConceptBankError(MedauditError):
    """A concept bank that is unreadable, incomplete or used with a model or layer it was not fitted for."""


class ExportError(MedauditError):
    """An ONNX export that failed or whose outputs do not match torch."""


class SpecError(ConfigError):
    """A model spec that cannot be used: the message names the file, the key and the fix."""


class CanonizerError(MedauditError):
    """A model that the requested canonizer cannot rewrite (an unsupported variant)."""
