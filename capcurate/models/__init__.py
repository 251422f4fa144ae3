"""Model references -> loaded models. Nothing outside this package knows where weights come from."""

from .ref import ModelRef, parse_model_ref

__all__ = ["ModelRef", "parse_model_ref"]
