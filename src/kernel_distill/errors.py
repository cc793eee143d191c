"""User-facing errors.

Every problem that a user can fix (a bad argument, a missing file, a malformed array) is raised as
:class:`KernelDistillError` at the boundary where it is detected, with a message that says what is wrong
and what to do. The command-line interface turns these into a one-line message and exit code 2.
"""


class KernelDistillError(ValueError):
    """A problem with the user's input, data or files, explained in plain words."""


class DataError(KernelDistillError):
    """A dataset could not be found, downloaded, verified or parsed."""
