"""The one exception type a user is meant to see.

Entry points (`train.py`, `sample.py`, `evaluate.py`, `python -m ...`) catch `UserError`, print its message as
one line prefixed with ``error:`` and exit with status 2. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input the user can fix: the message names the value, what is allowed and what to do."""
