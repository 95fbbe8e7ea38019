"""Artifact IO: every file or folder lands whole or not at all (write to a temp path, rename)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def missing_file_reason(path: Path) -> str | None:
    """Why path is not a readable regular file ("no such file", "not a regular file (a
    directory)", ...), or None when it is one. /dev/zero exists: saying it does not misleads."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"not a regular file ({kind})"


def output_problem(path: str | Path, folder: bool = False) -> str | None:
    """Why `path` cannot be written (as a file, or with folder=True as a folder copa creates or
    fills), or None: checked before any work, so an hour of work is never lost to a typo.
    The nearest existing folder above it must be a writable folder. A file named as a folder
    ("out/", as typed: Path drops the slash) is refused, not written as the file "out"."""
    if not folder and str(path).endswith(("/", os.sep)):
        return "ends in a slash, as a folder does; give a file name"
    path = Path(os.path.expanduser(str(path)))
    if path.is_symlink() and not path.exists():
        return dangling_link(path)
    if path.exists():
        if folder and not path.is_dir():
            return "exists and is not a folder"
        if not folder and path.is_dir():
            return "is a folder; give a file name"
        if not folder and not path.is_file():
            return missing_file_reason(path) or "not a regular file"
        if not os.access(path, os.W_OK):
            return "not writable"
        return None
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create it: {parent} is not writable"
    try:  # access() says yes to root everywhere; /proc still takes no new folder
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".copa-check-"))
    except OSError as exc:
        return f"cannot create it in {parent} ({exc.strerror or exc})"
    return None


def dangling_link(path: Path) -> str:
    """What a symbolic link that leads to no file is: one that loops (to itself, or through
    others back to itself), or one whose target is gone."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python before 3.13 says a loop so, not as an OSError
        return "a symbolic link that loops back to itself"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link that loops back to itself"
    return f"a symbolic link to {os.readlink(path)}, which does not exist"


class DamagedFile(ValueError):
    """An artifact copa wrote that is missing, not JSON or not the shape copa wrote it in (a
    truncated copy, a hand edit): the message names the file and what is wrong with it."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON artifact that must hold one object; anything else is a DamagedFile naming the
    file and how it is damaged (never a JSONDecodeError, KeyError or AttributeError later)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DamagedFile(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DamagedFile(f"{path}: unreadable ({reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedFile(f"{path}: damaged, not valid JSON ({exc.msg}: line {exc.lineno} "
                          f"column {exc.colno}; truncated?)") from None
    except (ValueError, RecursionError) as exc:
        raise DamagedFile(f"{path}: damaged, not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{path}: damaged, holds {_json_kind(data)} where copa wrote an "
                          "object")
    return data


def _json_kind(value: Any) -> str:
    return ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str)
            else "an array" if isinstance(value, list) else "an object")


def json_keys(data: dict[str, Any], path: Path, **kinds: type | tuple[type, ...]) -> None:
    """Each named key present in `data` (read from `path`) with a value of its kind, else a
    DamagedFile naming the file and the key."""
    for key, kind in kinds.items():
        if key not in data:
            raise DamagedFile(f"{path}: damaged, no '{key}'")
        if not isinstance(data[key], kind):
            raise DamagedFile(f"{path}: damaged, '{key}' is {_json_kind(data[key])}, not what "
                              "copa wrote")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same path once resolved (symbolic links, "..",
    "~"), or, both existing, one file under two names (a hard link)."""
    a, b = Path(os.path.expanduser(str(a))), Path(os.path.expanduser(str(b)))
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text, split on "\\n" only (a trailing "\\r" dropped): never on the
    other breaks str.splitlines() knows (U+2028, U+0085, \\x1c ...), which a JSON string may
    hold raw, as copa's own files (json.dumps with ensure_ascii=False) do. A text with no "\n"
    but some "\r" is an old Mac file: split on "\r" (JSON text holds no raw "\r" in a string)."""
    if "\n" not in text and "\r" in text:
        return text.split("\r")
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, data: Any, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def removed_on_failure(folder: Path) -> Iterator[Path]:
    """Yield `folder`; if the block fails, what it added there is removed again (the whole
    folder, when the block created it): a failed command leaves no half of its output. What
    was there before stays."""
    folder = Path(folder)
    existed = folder.exists()
    before = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    try:
        yield folder
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            for item in folder.iterdir():
                if item.name not in before:
                    if item.is_dir() and not item.is_symlink():
                        shutil.rmtree(item, ignore_errors=True)
                    else:
                        item.unlink(missing_ok=True)
        raise


@contextmanager
def quiet_fds() -> Iterator[None]:
    """Silence a library's import-time prints and warnings at the file-descriptor level
    (torchao and bitsandbytes print from C and from their own loggers on CPU machines)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a file, or of a folder's relative names and contents."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode())
        digest.update(sha256_file(item).encode())
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
