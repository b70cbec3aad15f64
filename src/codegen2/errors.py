"""Errors meant for the user: the CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """Something the user can fix (bad path, bad file, bad option); the message says what and where."""
