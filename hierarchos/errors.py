"""User-facing errors.

`HierarchosError` carries one line for the user (what, where, how to fix). The CLI
catches it once, prints it, and exits with code 2; bugs still raise normally.
"""


class HierarchosError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2
