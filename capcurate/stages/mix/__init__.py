"""``capcurate mix``: raw/synthetic caption mixing strategies over the dataset's DuckDB views."""

from .run import default_name, mix
from .strategies import STRATEGIES, MixOptions

__all__ = ["STRATEGIES", "MixOptions", "default_name", "mix"]
