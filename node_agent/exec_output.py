"""record-output files (spec §6) and session recordings (``.cast``): names, the directory guard,
opening without following links."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from core.errors import ApiError, BadRequest, NotFound

_NAME = re.compile(r"^exec_[A-Za-z0-9-]+\.(stdout|stderr|cast)$")
NOT_A_DIR = "Exec output directory isn't a regular directory"


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise BadRequest(f'Exec record-output file name "{name}" not valid')


def output_dir(path: Path, create: bool) -> Path:
    """The instance's exec-output directory; a symlink or non-directory there is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return path
        os.mkdir(path, 0o700)
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise ApiError(NOT_A_DIR, 400)
    return path


def create_files(directory: Path, op_id: str, suffixes: tuple[str, ...] = ("stdout", "stderr")) -> list[tuple[int, str]]:
    """Open (create, truncate) an operation's files (``exec_<id>.<suffix>``): their fds and names."""
    output_dir(directory, create=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    opened: list[tuple[int, str]] = []
    try:
        for suffix in suffixes:
            name = f"exec_{op_id}.{suffix}"
            opened.append((os.open(name, flags, 0o600, dir_fd=dfd), name))
    except BaseException:
        for fd, _ in opened:
            os.close(fd)
        raise
    finally:
        os.close(dfd)
    return opened


def list_files(directory: Path) -> list[str]:
    output_dir(directory, create=False)
    if not directory.exists():
        return []
    return sorted(n for n in os.listdir(directory) if _NAME.match(n))


def _open_dir(directory: Path, name: str) -> int:
    """The exec-output directory, for a lookup of ``name`` (validated) in it, never through a link."""
    check_name(name)
    output_dir(directory, create=False)
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f'Exec record-output file "{name}" not found') from None
    except OSError:
        raise ApiError(NOT_A_DIR, 400) from None


def open_file(directory: Path, name: str) -> int:
    """An fd for reading a recorded file; refuses links at both levels."""
    dfd = _open_dir(directory, name)
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        raise NotFound(f'Exec record-output file "{name}" not found') from None
    except OSError as exc:
        raise BadRequest(f'Exec record-output file "{name}" not valid: {exc.strerror}') from None
    finally:
        os.close(dfd)


def delete_file(directory: Path, name: str) -> None:
    dfd = _open_dir(directory, name)
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        raise NotFound(f'Exec record-output file "{name}" not found') from None
    finally:
        os.close(dfd)
