"""One exception type for problems the user can fix.

The CLI prints `error: <cause> -- <fix>` on one line and exits with code 2; no traceback.
"""


class NestuneError(Exception):
    def __init__(self, cause: str, fix: str = ""):
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} -- {fix}" if fix else cause)
