"""Atomic folder saves: everything is written into a temporary folder beside the target, synced to disk, then
swapped in, so the folder under its name is always either the old complete one or the new complete one (a
save that fails or is interrupted midway leaves the old folder as it was and loadable).

Files of the old folder that the new save does not write (a user's notes, a Trainer checkpoint's optimizer
state, another adapter's subfolder) are carried over into the new folder (hard links where the filesystem
allows, copies otherwise), so swapping never loses them. ``README.md`` is copied in before the save, so a
model card merges with the text the user wrote around it. Files and folders get the permissions a plain
``open`` / ``mkdir`` gives (the umask), not ``mkdtemp``'s 0700.

The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux (atomic); elsewhere two renames, the old folder
kept under ``.old-<name>-*`` beside the target until the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .files import _umask

__all__ = ["atomic_folder", "fsync_tree"]

CARRIED_IN_BEFORE = ("README.md",)


def fsync_tree(path: str) -> None:
    """``fsync`` every file and folder under ``path`` (and ``path``)."""
    for root, dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _set_modes(path: str, root_mode: int) -> None:
    """The folder gets ``root_mode``; files still at ``mkstemp``'s 0600 (kept by a rename) the umask's mode."""
    mask = _umask()
    os.chmod(path, root_mode)
    for root, dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p) and os.stat(p).st_mode & 0o777 == 0o600:  # mkstemp's mode, kept by a rename
                os.chmod(p, 0o666 & ~mask)


def _carry_over(old: str, new: str) -> None:
    """Link (or copy) into ``new`` every file of ``old`` that ``new`` does not have."""
    for root, dirs, files in os.walk(old):
        rel = os.path.relpath(root, old)
        target_root = os.path.normpath(os.path.join(new, rel))
        if os.path.isfile(target_root):
            dirs[:] = []
            continue
        os.makedirs(target_root, exist_ok=True)
        for f in files:
            src, dst = os.path.join(root, f), os.path.join(target_root, f)
            if os.path.lexists(dst):
                continue
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def atomic_folder(path: str, carry_over: bool = True):
    """``with atomic_folder(target) as tmp:`` write the folder's files into ``tmp``; on a clean exit it replaces
    ``target`` in one step (see the module docstring); on an exception ``target`` is left untouched.
    ``carry_over=False``: the new folder is exactly what was written into ``tmp`` (a checkpoint whose old shards
    would be stale beside the new ones); nothing of the old folder is kept."""
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{path} is a file; pass a folder to save into (it is created if missing).")
    parent, name = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        for f in CARRIED_IN_BEFORE if carry_over else ():
            if os.path.isfile(os.path.join(target, f)):
                shutil.copy2(os.path.join(target, f), os.path.join(tmp, f))
        yield tmp
        existed = os.path.isdir(target)
        _set_modes(tmp, os.stat(target).st_mode & 0o7777 if existed else 0o777 & ~_umask())
        if existed and carry_over:
            _carry_over(target, tmp)
        fsync_tree(tmp)
        if _inside(os.getcwd(), target):  # the folder is (inside) the working directory: it cannot be renamed
            _replace_contents(tmp, target)
            shutil.rmtree(tmp, ignore_errors=True)
        elif not os.path.isdir(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
            os.rename(target, os.path.join(old, name))
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_contents(src: str, dst: str) -> None:
    """Fallback for a target that cannot be renamed: move each file in with an atomic ``os.replace``."""
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            os.replace(os.path.join(root, f), os.path.normpath(os.path.join(dst, rel, f)))
