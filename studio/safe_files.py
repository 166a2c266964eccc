"""Reading files a user names without trusting what they are.

A path can name a FIFO (opening it blocks until someone writes, forever in a batch job), a device
(/dev/zero never ends, /dev/urandom is not text), a folder, or a regular file far larger than memory.
Everything the studio reads itself from a user path (data files, recipes) goes through here, so each of
those is one clear `BadInput` instead of a hang, a MemoryError or a traceback:

- the path must name a regular file (symlinks are followed). It is checked before opening, so a device
  is never even opened (opening some has side effects), and again on the open descriptor, so a file
  swapped for a FIFO between the two checks is refused too; the open itself never blocks (O_NONBLOCK).
- reads are bounded: a whole-file read refuses files over its limit, a line reader refuses lines and
  totals over theirs (a 100 GB file without a newline is refused after the first few megabytes).
- `check_structure` bounds the depth and size of parsed YAML/JSON (nesting thousands deep breaks the
  recursive code that walks it later; a few aliases can expand to billions of nodes).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from studio.errors import BadInput

MB = 1024 * 1024


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse(what: str, kind: str, path: Path) -> BadInput:
    return BadInput(f"this is {kind}, not a {what} (only regular files are read)", path=path)


def _os_problem(exc: OSError, what: str, path: Path) -> BadInput:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return BadInput(f"no such {what}", path=path)
    if isinstance(exc, PermissionError):
        return BadInput(f"cannot read the {what}: permission denied", path=path)
    return BadInput(f"cannot read the {what}: {exc.strerror or exc}", path=path)


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path if it names an existing regular file; BadInput naming the problem otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        if isinstance(exc, ValueError):
            raise BadInput(f"not a valid {what} path", path=repr(str(path))) from exc
        raise _os_problem(exc, what, path) from exc
    kind = _not_regular(mode)
    if kind is not None:
        raise _refuse(what, kind, path)
    return path


@contextlib.contextmanager
def open_regular(path: str | Path, what: str = "file") -> Iterator[IO[bytes]]:
    """The file opened for binary reading, once it is known to be a regular file (see the module doc)."""
    path = regular_file(path, what)
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _os_problem(exc, what, path) from exc
    try:
        kind = _not_regular(os.fstat(fd).st_mode)
        if kind is not None:  # swapped since the check above
            raise _refuse(what, kind, path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def _too_big(what: str, limit: int, path: Path) -> BadInput:
    return BadInput(f"the {what} is larger than {limit // MB} MB, the most the studio reads", path=path)


def read_bytes(path: str | Path, what: str, limit: int) -> bytes:
    """The whole file, refused when it is larger than `limit` bytes (only limit + 1 bytes are read)."""
    with open_regular(path, what) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise _too_big(what, limit, Path(path))
    return data


def read_text(path: str | Path, what: str, limit: int) -> str:
    """The whole file as UTF-8 text (a leading byte-order mark dropped), bounded like `read_bytes`."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"the {what} is not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from exc


def text_lines(fh: IO[bytes], path: Path, what: str, max_line: int, max_total: int) -> Iterator[str]:
    """The lines of an open file as UTF-8 text, line endings kept, read one at a time: a line longer
    than `max_line` bytes or more than `max_total` bytes read in all is refused, as is text that is
    not UTF-8 (naming the byte offset in the file)."""
    offset = 0
    first = True
    while True:
        raw = fh.readline(max_line + 1)
        if not raw:
            return
        if len(raw) > max_line:
            raise BadInput(
                f"a line of the {what} starting at byte {offset} is longer than {max_line // MB} MB",
                path=path,
            )
        if offset + len(raw) > max_total:
            raise _too_big(what, max_total, path)
        try:
            line = raw.decode("utf-8-sig" if first else "utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(
                f"the {what} is not UTF-8 text ({exc.reason} at byte {offset + exc.start})", path=path
            ) from exc
        offset += len(raw)
        first = False
        yield line


def check_structure(data: Any, what: str, path: str | Path | None, max_depth: int, max_nodes: int) -> None:
    """Refuse parsed YAML/JSON nested deeper than `max_depth` or with more than `max_nodes` values.

    Walks without recursion and counts a value each time it is reached, so YAML aliases count as the
    copies they stand for; it stops at the first limit, so a hostile document costs at most `max_nodes`
    steps."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise BadInput(f"the {what} has more than {max_nodes:,} values (aliases included)", path=path)
        if isinstance(value, dict):
            children: Any = [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple, set)):
            children = value
        else:
            continue
        if depth >= max_depth and children:
            raise BadInput(f"the {what} is nested more than {max_depth} levels deep", path=path)
        stack.extend((child, depth + 1) for child in children)


def make_parent_folder(path: Path) -> None:
    """Create the folders above `path` that do not exist yet (as `mkdir -p`, what a user who types
    `--out new/dir/x` expects), refusing a path that runs through a file or into an unwritable place."""
    parent = path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput("is a file, not a folder; choose another place", path=ancestor)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create the folder ({exc.strerror or exc})", path=parent) from exc
