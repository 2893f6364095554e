"""errors.py: the one exception type for mistakes a user can fix, and the guard that reports them.

A missing data root, a bad flag value, a corrupt image, a checkpoint that is not there: these raise
`UserError` with one message that names the culprit and the fix. The command-line entry points run
under `cli()`, which prints that message and exits with status 2, without a traceback. Any other
exception is a bug and keeps its traceback.
"""

import sys


class UserError(ValueError):
    """Bad input (a file, a folder, a flag value): the message says which and how to fix it."""


def reason(e):
    """An exception as one line, to quote in a UserError: its type and the first line of its
    message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def cli(main):
    """Run main(); a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return main()
    except UserError as e:
        text = str(e).strip()
        if "Original Traceback" in text:  # a DataLoader worker re-raises it inside its traceback
            text = text.splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
