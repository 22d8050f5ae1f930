"""User-facing errors.

Owns the one exception type that means "the user asked for something we cannot do": a missing file, a bad
size string, an unknown model type, a budget too small to run. The CLI turns it into one line on stderr and exit
status 2; a server turns it into an HTTP 4xx. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """What is wrong and what to do about it, in one line."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what}: {fix}" if fix else what)
