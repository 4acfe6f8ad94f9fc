"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class DistillError(Exception):
    """A user-facing error: bad input, missing file, failed gate. The message says where and why."""
