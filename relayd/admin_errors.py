"""What can go wrong in ``relayd streams …`` and ``relayd status``, and the exit code of each.

Both ways the CLI reaches the streams raise these: the admin API's HTTP client
(relayd/admin_client.py) and the direct Redis reads (relayd/admin_direct.py), so neither has
to import the other. ``exit_code`` says what kind of failure it was (docs/operations.md,
"Admin CLI"):

    AdminError          1  refused or failed (a conflict, a bad request, Redis down)
    ├── Unauthorized    3  no admin key, or a wrong one
    ├── Unreachable     4  relayd (or its Redis) does not answer: down, wrong URL, timeout, lost
    ├── NotFound        5  no such stream
    ├── HistoryMissing  6  an export completed, but part of the stream's history is gone (gaps)
    └── BadConfig      78  the config file or a RELAYD_* variable is invalid (as for every command)
"""

from __future__ import annotations

from relayd.errors import RelaydError

EXIT_ERROR = 1
EXIT_USAGE = 2  # click's own code for a usage error
EXIT_UNAUTHORIZED = 3
EXIT_UNREACHABLE = 4
EXIT_NOT_FOUND = 5
EXIT_HISTORY_MISSING = 6
# sysexits.h EX_CONFIG, for every relayd command: a config problem, which retrying will not fix
# (a systemd unit can say RestartPreventExitStatus=78), apart from a failure at run time (1).
EXIT_CONFIG = 78


class AdminError(RelaydError):
    """A command failed; ``str()`` is the one line the CLI prints."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class Unauthorized(AdminError):
    exit_code = EXIT_UNAUTHORIZED


class Unreachable(AdminError):
    exit_code = EXIT_UNREACHABLE


class NotFound(AdminError):
    exit_code = EXIT_NOT_FOUND


class HistoryMissing(AdminError):
    """Everything stored was written out, but the stream's history has gaps (trimmed, expired)."""

    exit_code = EXIT_HISTORY_MISSING


class BadConfig(AdminError):
    """The config file or a ``RELAYD_*`` variable is invalid (a :class:`~relayd.errors.ConfigError`)."""

    exit_code = EXIT_CONFIG
