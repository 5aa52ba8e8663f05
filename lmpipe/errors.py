"""Errors a user can cause. Each carries one line that names the file, key or row at fault."""


class LmpipeError(Exception):
    """A problem with the user's input: printed as one line, exit code `exit_code`."""

    exit_code = 1


class ConfigError(LmpipeError):
    """Bad params (unknown key, wrong type, inconsistent values)."""

    exit_code = 2


class DataError(LmpipeError):
    """Missing, malformed or empty input data."""

    exit_code = 1


class ServiceError(LmpipeError):
    """A service the run needs (the MLflow tracking server, the Prefect API) does not answer."""

    exit_code = 3
