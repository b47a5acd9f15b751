"""prefopt: align causal language models with preference data (DPO, ODPO, Bradley-Terry)."""

__version__ = "0.1.0"

from prefopt.errors import ConfigError, DataError, PrefoptError  # noqa: E402

__all__ = ["ConfigError", "DataError", "PrefoptError", "__version__"]
