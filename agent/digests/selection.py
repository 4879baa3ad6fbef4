"""Which files of a dataset are digested: the ``include`` and ``exclude`` globs of its config.

Paths are relative to the dataset root, ``/``-separated. ``*`` and ``?``
match within one path segment, ``[...]`` is a character class, ``**`` spans
any number of directories (``a/**/b`` matches ``a/b`` and ``a/x/y/b``). A
pattern without a ``/`` matches a name at any depth (``*.tmp``), as in
``.gitignore``. ``exclude`` wins over ``include`` and prunes directories: an
excluded directory is not entered. With ``include`` set, a directory left
with no included file is not part of the tree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


def compile_glob(pattern: str) -> re.Pattern[str]:
    """One glob as an anchored regular expression over a relative path."""
    anchored = "/" in pattern.rstrip("/")
    body = _translate(pattern.strip("/"))
    return re.compile(("" if anchored else "(?:.*/)?") + body + r"\Z", re.DOTALL)


def _translate(pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            end = pattern.find("]", i + 2 if pattern.startswith(("[!", "[^"), i) else i + 1)
            if end < 0:
                out.append(re.escape(char))
                i += 1
                continue
            inner = pattern[i + 1:end]
            if inner.startswith("!"):
                inner = "^" + inner[1:]
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Selection:
    """The compiled globs of one dataset."""

    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def of(cls, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Selection:
        return cls(tuple(compile_glob(p) for p in include), tuple(compile_glob(p) for p in exclude))

    @property
    def filtered(self) -> bool:
        """Whether any glob is set (without one, every file is wanted: the walk skips the check)."""
        return bool(self.include or self.exclude)

    @property
    def filters(self) -> bool:
        """Whether ``include`` narrows the tree (empty directories are then dropped)."""
        return bool(self.include)

    def wants_file(self, path: str) -> bool:
        if any(p.match(path) for p in self.exclude):
            return False
        return not self.include or any(p.match(path) for p in self.include)

    def enters_dir(self, path: str) -> bool:
        return not any(p.match(path) for p in self.exclude)
