"""One error hierarchy for user mistakes: the CLI prints them as one line, exit code 1.

Messages follow "found -> expected -> fix". Bugs are not AutotransferErrors and keep
their traceback.
"""


class AutotransferError(Exception):
    """A problem the user can fix; the message says how."""


class DataError(AutotransferError):
    """The dataset folder is missing, empty or malformed."""


class BackboneError(AutotransferError):
    """Unknown backbone, or its weights cannot be had."""


class PlanError(AutotransferError):
    """A Plan with values that do not fit together or do not fit the backbone."""


class RunError(AutotransferError):
    """A RUN folder that is not (or not yet) an autotransfer run."""
