"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class MtnlgError(Exception):
    """A problem the user can fix: bad input, a missing file, a config that does not fit.

    The CLI prints ``error: <message>`` and exits with code 2; it never shows a traceback for these.
    """

    exit_code = 2

    def __init__(self, message: object = "") -> None:
        # messages quote user input (keys, file names, lines): escape what would break the one-line contract
        super().__init__("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(message)))


class ConfigError(MtnlgError):
    """An invalid config file, key or value."""


class WorkspaceError(MtnlgError):
    """No workspace, or a workspace that is not in the state a command needs."""

