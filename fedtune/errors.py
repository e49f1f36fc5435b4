"""The one exception type users see: its message names the problem and the fix."""


class FedtuneError(Exception):
    """A problem the user can fix (bad option, missing file, unusable data)."""


class ConfigError(FedtuneError, ValueError):
    """An invalid configuration value."""


class DataError(FedtuneError, ValueError):
    """Data that cannot be used as given."""


class ClusterUnreachable(ConfigError):
    """simulation.ray_address names no Ray cluster that can be joined (found only when Ray tries)."""
