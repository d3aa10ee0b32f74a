"""Every problem the user fixes, as one class tree.

A ``UserError`` carries one line naming the thing that is wrong and the fix. The
job harness (``teacher_logits.job``) catches this one class and prints the line
instead of a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user fixes (bad input, missing file); the message names the fix."""


class ConfigError(UserError, ValueError):
    """A bad config value; the message names the key and the fix."""


class GpuConfigError(ConfigError):
    """A problem with ``gpus``, ``gpus_per_model`` or the GPU mask of the shell."""


class LockError(ConfigError):
    """A lock the filesystem cannot take (flock failing with more than "already held");
    the message names the lock, the OS error and where the lock must live instead."""


class DataError(UserError):
    """A dataset, row or chat conversation the workflow cannot use."""


class TeacherError(UserError):
    """A teacher that cannot be loaded or run as configured."""


class ShardError(UserError, ValueError):
    """A shard that is missing, unreadable or inconsistent; the message says what."""


class StoreError(UserError):
    """A gathered store that cannot be checked at all (no or unreadable manifest), or that
    was regathered under a reader opened on it."""


class DiskFullError(UserError):
    """Not enough room on the disk for what a job must write."""


class TrainingInputError(UserError, ValueError):
    """A batch, store or student that the training helpers cannot use as asked."""


class TokenizerMismatch(UserError, ValueError):
    """A student's tokenizer that differs from the teacher's; the message names the first difference."""


class ExportError(UserError):
    """An export (``teacher-logits export``) that cannot be made as asked."""
