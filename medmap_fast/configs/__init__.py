"""The YAML configs shipped inside the package (package data, read through :mod:`importlib.resources`).

    demo.yaml        `medmap-fast demo`
    demo_quick.yaml  `medmap-fast demo --quick`
    paper.yaml       the paper-scale run (a GPU job): `medmap-fast pretrain --config paper --data CACHE ...`

``--config`` takes a path or one of these names, with or without ``.yaml`` (:func:`resolve`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SUFFIX = ".yaml"


def directory() -> Path:
    """The folder holding the shipped configs (the installed package's own folder; never a checkout's ``configs/``)."""
    root = files(__name__)
    if not isinstance(root, Path):  # e.g. a zipped install: the configs are not plain files
        raise RuntimeError(f"medmap_fast.configs is not a folder on disk ({root!r}); install the package unzipped")
    return root


def names() -> list[str]:
    """The shipped config names, without ``.yaml``, sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in directory().iterdir() if p.name.endswith(SUFFIX))


def resolve(value: str | Path) -> Path:
    """``--config VALUE``: an existing file, else the name of a shipped config (``paper`` or ``paper.yaml``).

    Raises ``FileNotFoundError`` naming the value and listing the shipped names.
    """
    path = Path(value)
    if path.is_file():
        return path
    text = str(value)
    name = text[: -len(SUFFIX)] if text.endswith(SUFFIX) else text
    shipped = names()
    if path.name == text and name in shipped:  # a bare name, no folder part
        return directory() / (name + SUFFIX)
    hint = ""
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    if stem in shipped:
        hint = f" (the shipped one is --config {stem})"
    raise FileNotFoundError(
        f"{text}: no such file and not a shipped config{hint}; shipped configs: "
        f"{', '.join(shipped)} (give the name, with or without .yaml, or a path to a YAML file)"
    )
