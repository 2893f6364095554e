"""plumbing/atomic.py: the one atomic write of the project, for checkpoints, JSON files and
tools/plot.py's pictures.

`replacing` yields a temporary path beside the target and renames it over the target only when
the block succeeds, so a reader never sees half a file and a crash (a kill, a full disk) leaves the
previous file intact. log.jsonl is the exception by design: it is appended to, one record a line.
"""

import contextlib
import json
import os

from plumbing.errors import UserError


@contextlib.contextmanager
def replacing(path):
    """The one atomic write of the project: yields a temporary path beside `path`, renamed over it
    when the block succeeds and removed when it fails, so a reader never sees half a file."""
    # the process id in the name: two processes writing one file at the same moment (a redraw of
    # RUN/curves.png while the run trains, and a user) must not share a temporary file
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path, keep_previous=False):
    """torch.save through `replacing`. keep_previous: the file it replaces stays as <name>.prev.pt.
    A failed write (disk full) leaves the previous files intact and is a UserError naming them."""
    import torch  # here, not above: tools/plot.py imports this module without torch (2 s less)

    previous = os.path.splitext(path)[0] + ".prev.pt"
    try:
        if keep_previous and os.path.isfile(previous) and os.path.isfile(path):
            # at most three checkpoints on disk while the new one is written
            os.remove(previous)
        with replacing(path) as tmp:
            torch.save(obj, tmp)
            if keep_previous and os.path.isfile(path):
                os.replace(path, previous)
    except OSError as e:
        kept = ", ".join(f for f in (path, previous) if os.path.isfile(f)) or "nothing"
        hint = f"free some space, then continue with --resume {os.path.dirname(path) or '.'}"
        raise UserError(f"could not write {path} ({e.strerror or e}); kept: {kept}; {hint}") from e


def write_json(path, obj):
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
