"""A commit checked out in a temporary git worktree, for the benchmarks that time an older commit beside
this tree (``--baseline REV``): the older package is imported from the worktree through ``PYTHONPATH``."""

import contextlib
import pathlib
import subprocess
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def worktree(rev: str):
    """Commit ``rev`` checked out (detached) in a temporary worktree of this repository; yields
    ``(path, short sha)`` and removes the worktree on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        wt = pathlib.Path(tmp) / "wt"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), rev], check=True,
                       capture_output=True)
        try:
            sha = subprocess.run(["git", "-C", str(wt), "rev-parse", "--short", "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
            yield wt, sha
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], capture_output=True)
