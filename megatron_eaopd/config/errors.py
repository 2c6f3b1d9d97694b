"""Configuration errors (re-exported from :mod:`megatron_eaopd.settings`, where every settings class lives)."""

from megatron_eaopd.settings import ConfigError, format_validation_error

__all__ = ["ConfigError", "format_validation_error"]
