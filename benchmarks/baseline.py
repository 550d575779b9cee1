"""Run the speed layer of another commit beside this one, in the same benchmark run.

`checkout(rev)` puts that commit in a temporary `git worktree` (detached, removed afterwards);
`run_in(tree, code, *args)` runs Python `code` with that tree first on the path (its own core/,
receiver/, serving/), with this checkout's interpreter and installed dependencies. A subprocess,
not a fork: a forked process would keep the modules this one already imported.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """The tree of commit `rev` (anything `git rev-parse` reads), for the duration."""
    parent = Path(tempfile.mkdtemp(prefix="rf-baseline-"))
    tree = parent / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), rev],
        check=True,
    )
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
        )
        with contextlib.suppress(OSError):
            parent.rmdir()


def describe(tree: Path) -> str:
    """`<short sha> <subject>` of the commit checked out in `tree`."""
    out = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out if len(out) <= 90 else out[:87] + "..."


def popen_in(tree: Path, code: str, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start `python -c code args...` inside `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", code, *args], cwd=str(tree), env=env, **kwargs
    )


def run_in(tree: Path, code: str, *args: str) -> str:
    """Run `python -c code args...` inside `tree`; its standard output."""
    proc = popen_in(tree, code, *args, stdout=subprocess.PIPE)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step in {tree} failed (exit {proc.returncode})")
    return bytes(out).decode()
