"""A private on-disk cache for the built C kernel: only folders and files no other user can write, and
only entries whose content matches the digest recorded when this code built them.

Who could have written a path: its owner, and anyone its group/other write bits let in, and whoever
can rename entries in any folder above it. So a cache folder is used only if it is a real folder
owned by the current user and not writable by group or others, and every folder above it (after
resolving symlinks) is owned by the current user or root and not writable by group or others, except
for sticky-bit folders such as /tmp, where others cannot rename or remove what is not theirs (allowed
above the cache, never as the cache itself). An entry is read only through a descriptor opened
without following symlinks, owned by the current user and not group/world-writable, and is used only
if its SHA-256 equals the one stored beside it when it was built (same folder, same checks).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path


def untrusted_reason(folder: Path) -> str | None:
    """Why another user could have written into ``folder`` (which must exist), or None if nobody can."""
    uid = os.getuid()
    real = Path(os.path.realpath(folder))
    st = os.lstat(real)
    if not stat.S_ISDIR(st.st_mode):
        return f"{real} is not a folder"
    if st.st_uid != uid:
        return f"{real} is owned by uid {st.st_uid}, not this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{real} is writable by {_writers(st.st_mode)}"
    for parent in real.parents:
        st = os.lstat(parent)
        if st.st_uid not in (uid, 0):
            return f"{parent} (above the cache) is owned by uid {st.st_uid}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            return f"{parent} (above the cache) is writable by {_writers(st.st_mode)}"
    return None


def untrusted_file_reason(path: Path) -> str | None:
    """Why another user could have written the file ``path`` (which must exist), or None if nobody can:
    it must be a regular file owned by this user or root, below folders owned by this user or root,
    none writable by others, nor by a group other than this user's private one (the user-private-group
    convention, where umask 002 makes everything group-writable), except sticky folders such as /tmp."""
    if not hasattr(os, "getuid"):
        return None  # no POSIX owners to judge (Windows)
    real = Path(os.path.realpath(path))
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        return f"{real} is not a regular file"
    if st.st_uid not in (os.getuid(), 0):
        return f"{real} is owned by uid {st.st_uid}, not this user (uid {os.getuid()})"
    if _shared_write(st):
        return f"{real} is writable by {_writers(st.st_mode)}"
    for parent in real.parents:
        st = os.lstat(parent)
        if st.st_uid not in (os.getuid(), 0):
            return f"{parent} (above {real.name}) is owned by uid {st.st_uid}"
        if _shared_write(st) and not st.st_mode & stat.S_ISVTX:
            return f"{parent} (above {real.name}) is writable by {_writers(st.st_mode)}"
    return None


def _shared_write(st: os.stat_result) -> bool:
    """Whether someone besides the owner may write: others, or a group that is not the owner's own."""
    return bool(st.st_mode & stat.S_IWOTH) or (bool(st.st_mode & stat.S_IWGRP) and not _private_group(st.st_gid))


def _private_group(gid: int) -> bool:
    """Whether ``gid`` is this user's private group: named as the user, no other member."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == os.getgid() and group.gr_name == user and set(group.gr_mem) <= {user}


def _writers(mode: int) -> str:
    return " and ".join(w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if mode & bit)


def private_folder(folder: Path) -> tuple[Path | None, str | None]:
    """(the resolved folder, None) if it exists or could be made (mode 0700) and nobody else can write
    it; else (None, why not)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        reason = untrusted_reason(folder)
    except OSError as exc:
        return None, f"cannot use {folder}: {exc.strerror or exc}"
    if reason is not None:
        return None, reason
    return Path(os.path.realpath(folder)), None


def read_private(path: Path) -> bytes:
    """The content of ``path``, read through one descriptor: not a symlink, a regular file owned by this
    user, not writable by group or others (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(f"{path} is not a private file of this user")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(entry: Path, record: Path) -> bytes | None:
    """The bytes of ``entry`` if they hash to the digest in ``record`` (both private files), else None."""
    try:
        data = read_private(entry)
        want = read_private(record).decode("ascii", "replace").strip()
    except OSError:
        return None
    return data if digest(data) == want else None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a fresh private file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def store(data: bytes, entry: Path, record: Path) -> None:
    """Record the digest of ``data`` (a fresh build), then write ``data`` to ``entry`` as a new
    file. The built file itself is not moved there: this process has it loaded, and a file mapped by a live
    process must never be the one a later writer could truncate (that faults the process). Builds are
    deterministic, so concurrent builders write the same pair."""
    write_atomic(record, (digest(data) + "\n").encode())
    write_atomic(entry, data)
