"""The one exception type hashret raises for problems a user can fix.

Library code raises :class:`HashretError` with a one-line message that names the
problem and the fix; the CLI and the benchmark scripts turn it into ``error: ...``
on stderr and a non-zero exit instead of a traceback.
"""


class HashretError(ValueError):
    """Bad input, a missing or corrupt file, or a mismatch between artefacts."""


def check(condition, message):
    """Raise :class:`HashretError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise HashretError(message)
