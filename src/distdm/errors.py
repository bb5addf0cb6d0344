"""The one exception type a user can cause, so callers and the CLI can catch it in one place."""


class DistdmError(ValueError):
    """A problem with the user's input, settings or run directory; the message says what to change."""
