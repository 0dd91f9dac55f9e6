"""The one base class of errors a user can fix.

`adarevd` commands print a `UserError`'s message and exit with status 2. Any other exception is a
bug: it keeps its traceback. Each error says which file, shard or key it is about, and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Input, settings or surroundings (a store, a cluster) that the user must fix."""


class InvalidInput(UserError, ValueError):
    """A value, file or setting that cannot be used as given."""


class NotFound(UserError, FileNotFoundError):
    """A file, folder, shard or video that is not where the user said."""


class AlreadyExists(UserError, FileExistsError):
    """Something is in the way, and replacing it was not asked for."""
