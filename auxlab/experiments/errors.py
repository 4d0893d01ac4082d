"""The one error of the experiments runner's own making: :class:`ConfigError`.

It lives alone so that every module that refuses a value (the config, the strategies, the data,
the runner) imports it from here, and none imports another only for its error.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value received."""
