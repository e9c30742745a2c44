"""Helpers every stage shares: configuration, image sets and decoding, shards, parallel runs,
atomic writes, logging."""


class UserError(Exception):
    """A problem with the user's input or settings: reported as one line, no traceback."""
