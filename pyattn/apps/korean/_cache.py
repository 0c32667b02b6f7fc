"""Where converted weights and trained vocabularies live: a user cache, never the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The pyattn cache folder (``$PYATTN_CACHE``, else ``$XDG_CACHE_HOME/pyattn``, else
    ``~/.cache/pyattn``), with ``parts`` appended and created.

    Arguments:
        parts: sub-folder names.
    Returns:
        The folder, created if missing.
    """
    root = os.environ.get("PYATTN_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "pyattn")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so that two processes
    (e.g. pytest-xdist workers) filling the cache at once never read a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
