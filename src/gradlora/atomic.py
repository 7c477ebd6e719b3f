"""All-or-nothing file writes: a reader, or a run killed mid-write, never sees half a file.

Each writer writes a hidden temporary file beside the target and moves it into place with
``os.replace`` (atomic on POSIX within one file system).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then move it to ``path``.

    The parent folder is created; on any error the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    return write_text(path, json.dumps(data, indent=indent))


def write_files(folder: str | os.PathLike, write: Callable[[Path], Any], names: list[str]) -> Path:
    """Call ``write(tmp_dir)``, then move the files ``names`` from it into ``folder``, each with
    ``os.replace``: every file lands whole, and none lands if ``write`` fails."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".gradlora-tmp-") as tmp:
        write(Path(tmp))
        for name in names:
            os.replace(Path(tmp, name), folder / name)
    return folder


def replace_dir(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh folder beside ``target``, then put it in ``target``'s
    place (a partial ``target`` from an interrupted earlier attempt is removed first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        write(Path(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        os.makedirs(tmp)  # so that TemporaryDirectory's cleanup finds its folder
    return target
