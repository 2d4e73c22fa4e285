"""Build the grammar's Lark parser from a cache file: the LALR tables take a quarter of a
second to build, which every single command would pay.

The file lives in the root-only /run/bpfilter, named after a hash of the grammar, Lark's
version and the options, so a file in place never changes: it is written under a temporary
name and renamed, and a grammar change simply uses another name. Lark checks the file
against the grammar again when it loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import lark

from bpfilter.grammar import shapes

DIRECTORY = Path("/run/bpfilter")


def install(directory: Path = DIRECTORY) -> None:
    """Have grammar.shapes load (or build and save) its parser through the cache; call
    before the first parse. Nothing when not root or the directory cannot be used."""
    if os.geteuid() != 0 or "cache" in shapes.LARK_OPTIONS:
        return
    key = f"{lark.__version__}\0{sorted(shapes.LARK_OPTIONS.items())}\0{shapes.grammar_text()}"
    path = directory / f"lark-shapes-{hashlib.sha256(key.encode()).hexdigest()[:20]}.cache"
    if path.is_file():
        shapes.LARK_OPTIONS["cache"] = str(path)
        return
    with contextlib.suppress(OSError):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{path.name}.{os.getpid()}"
        shapes.LARK_OPTIONS["cache"] = str(tmp)
        try:
            shapes.lark_parser()  # builds the tables and writes them to tmp
            os.replace(tmp, path)
            for old in directory.glob("lark-shapes-*.cache"):  # of earlier grammars
                if old != path:
                    old.unlink(missing_ok=True)
        finally:
            shapes.LARK_OPTIONS["cache"] = str(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


__all__ = ["install"]
