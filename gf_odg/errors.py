"""User-facing errors.

Every mistake a user can make (a bad config value, a missing file, an unreachable model) is raised
as a `GFODGError` whose message says what was wrong, which key or path, and what to do. `train.py`
prints the message on one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class GFODGError(Exception):
    """An error caused by the user's input, with a message written for the user."""


class ConfigError(GFODGError):
    """A configuration value is invalid; raised before any model is loaded."""


class RewardError(GFODGError):
    """A reward module returned something unusable (wrong count, NaN, +inf) or raised."""


class CheckpointError(GFODGError):
    """A checkpoint is missing, incomplete, corrupt, or was made for another base model."""


class DistributedError(GFODGError):
    """The training processes fell out of step: a collective timed out or a peer stopped."""
