"""Atomic file writes, and reads of the JSON and safetensors files of checkpoints with errors that name the file.

Atomic writes: readers see either the old file or the complete new one, never a partial write. A writer fills a
temporary file in the destination folder (same file system, so the final ``os.replace`` is an atomic rename); on any
error the temporary file is removed and the destination is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _default_file_mode() -> int:
    # mkstemp creates files 0600; give the final file the mode an ordinary open() would (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block exits cleanly it atomically replaces ``path``.

    Use it with writers that take a file name (``np.save``, ``torch.save``, ``safetensors.torch.save_file``).
    ``durable=True`` also fsyncs the file and its folder, for checkpoints that must survive a power loss;
    caches whose entries are verified on read can skip that cost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable and hasattr(os, "O_DIRECTORY"):
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def read_json_object(path: str | os.PathLike, written_by: str) -> dict[str, Any]:
    """The JSON object in ``path``; errors name the file and what should have written it (``written_by``)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (expected a file written by {written_by})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected a file written by {written_by}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous) as a safetensors file, atomically and durably."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from err
