"""Atomic output folders for the converters and the synthetic generator.

A data set is written into a fresh temporary folder beside its destination (same parent, so same file
system) and swapped in when complete: the old folder, if any, is renamed to a trash name, the new one is
renamed into place, and the trash is deleted. A failed run (exception, Ctrl-C) deletes its temporary
folder; a killed one (OOM, SIGKILL) leaves it behind as ``.NAME.tmp-*`` beside ``NAME``. Either way the
previous data set stays complete and loadable: nobody ever sees a ``meta.json`` describing files that are
not all there.

Only a folder that looks like a previous output (nothing but the expected entries) is replaced, so that a
mistyped ``--out`` cannot delete unrelated files.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from datasets.schema import DataError

__all__ = ["OutputError", "run_converter", "staged_output"]


class OutputError(ValueError):
    """The output folder cannot be (re)placed: it holds something other than a previous output."""


def _check_replaceable(out: Path, entries: dict[str, str]) -> None:
    """Raises OutputError unless ``out`` is absent, empty, or holds only ``entries``.

    Args:
        entries: top-level name -> ``"file"`` or a glob of the only files allowed in that sub-folder
            (e.g. ``{"meta.json": "file", "train": "part-*.parquet"}``).
    """
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; expected a new or empty folder, or a previous output")
    unexpected: list[str] = []
    for child in sorted(out.iterdir()):
        kind = entries.get(child.name)
        if kind is None:
            unexpected.append(child.name)
        elif kind == "file":
            if not child.is_file():
                unexpected.append(child.name)
        elif not child.is_dir():
            unexpected.append(child.name)
        else:
            bad = [f for f in sorted(child.iterdir()) if not (f.is_file() and f.match(kind))]
            unexpected += [f"{child.name}/{f.name}" for f in bad]
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise OutputError(
            f"{out}: holds {shown}, which a previous output would not; refusing to replace it "
            f"(choose a new or empty folder; an output holds only {', '.join(sorted(entries))})"
        )


def _sibling(out: Path, tag: str) -> Path:
    """A new name beside ``out``: ``.NAME.TAG-PID-RANDOM``."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def staged_output(out_dir: str | os.PathLike, entries: dict[str, str]) -> Iterator[Path]:
    """Yields a temporary folder to write a whole output into; on success it replaces ``out_dir``.

    Args:
        out_dir: the destination; absent, empty, or a previous output holding only ``entries`` (a symlink
            is followed: its target is replaced).
        entries: what an output holds, see :func:`_check_replaceable`.

    Raises:
        OutputError: ``out_dir`` holds other things (checked before anything is written).
    """
    out = Path(out_dir).resolve()
    _check_replaceable(out, entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()  # the usual permissions (umask), which it keeps once renamed
    try:
        yield tmp
        _check_replaceable(out, entries)  # again: something may have appeared meanwhile
        trash = None
        if out.exists():
            trash = _sibling(out, "old")
            os.rename(out, trash)  # renames within one folder: atomic
        try:
            os.rename(tmp, out)
        except BaseException:
            if trash is not None:
                os.rename(trash, out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def run_converter(write: Callable[[], dict[str, Any]], out: str) -> tuple[Optional[dict[str, Any]], int]:
    """Runs a converter CLI's write step; an expected failure becomes one line on stderr and an exit code.

    Returns ``(meta, 0)``, or ``(None, code)``: 3 bad input (:class:`DataError`), 2 the output folder cannot be
    replaced (:class:`OutputError`), 1 a write error (disk full, permissions), 130 Ctrl-C. ``out`` is unchanged
    on every failure (:func:`staged_output`).
    """
    try:
        return write(), 0
    except DataError as e:
        print(f"data error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return None, 3
    except OutputError as e:
        print(f"output error: {e}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        print(f"interrupted; {out} is unchanged", file=sys.stderr)
        return None, 130
    except OSError as e:
        print(f"error: {e}; {out} is unchanged", file=sys.stderr)
        return None, 1
