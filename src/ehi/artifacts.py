"""Artifact directories: written atomically, with a manifest of format version and checksums.

A reader never sees a half-written model: files go to a temporary sibling directory, are
fsynced, and the directory is swapped with the old one in one atomic step (Linux
renameat2 RENAME_EXCHANGE; elsewhere two renames). Temporaries a crashed save left are
removed by the next save. Nothing is ever unpickled.

The manifest lists each file's checksum and carries one of its own values (format 2), so
that an edit of a value that no file holds (the budget calibration, say) is refused like a
corrupted file. A save keeps the permissions the user gave the folder and its files (or the
umask's for new ones): a service account that could read a model still can after a save.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

from ehi import __version__

FORMAT = "ehi-model"
FORMAT_VERSION = 2  # 2: the manifest's values are checksummed too (MANIFEST_DIGEST)
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"


class ArtifactError(RuntimeError):
    """A model directory that cannot be trusted: missing, corrupted, foreign or too new."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it to read
    it back would briefly loosen it for every other thread)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def manifest_digest(manifest: dict) -> str:
    """The checksum of a manifest's values (all but the checksum itself), as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` with the checksum of its values added (what a save writes)."""
    return {**manifest, MANIFEST_DIGEST: manifest_digest(manifest)}


def write_file_atomic(path: str | Path, write: Callable[[object], None] | str | bytes) -> Path:
    """One file, whole or not at all: written beside ``path``, fsynced, renamed over it.
    ``write`` is the content, or a function given the open binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # a plain file's permissions, not mkstemp's 0600
        with os.fdopen(fd, "wb") as fh:
            if callable(write):
                write(fh)
            else:
                fh.write(write.encode("utf-8") if isinstance(write, str) else write)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def is_artifact(path: str | Path) -> bool:
    """An ehi model or checkpoint folder (its manifest names our format)."""
    mpath = Path(path) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_target(target: str | Path, overwrite: bool = True, flag: str = "--out") -> Path:
    """Refuse, before any work, to write where something the user did not ask to replace
    lives: a file, or a non-empty folder that is not an ehi model. An existing ehi model is
    replaced only with ``overwrite``."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ArtifactError(f"{flag} {target}: exists and is not a folder; refusing to replace it")
    if target.is_dir() and any(target.iterdir()):
        if not is_artifact(target):
            raise ArtifactError(f"{flag} {target}: is a non-empty folder that is not an ehi model; refusing to replace it")
        if not overwrite:
            raise ArtifactError(f"{flag} {target}: holds an ehi model already; pass --overwrite to replace it")
    parent = target.parent
    try:  # can we write there at all? (found out before the work, not after it)
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ArtifactError(f"{flag} {target}: cannot write in {parent} ({e.strerror or e})") from None
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot, so the caller falls back to two renames."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale(target: Path) -> None:
    """Temporaries a crashed save left beside ``target`` (never anything else)."""
    for p in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if p.is_dir() and (p.name.endswith(".tmp") or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def _modes(target: Path) -> tuple[int, Callable[[str], int]]:
    """The folder's mode for a save of ``target``, and each file's by name: what the user gave
    the existing ones, else what the umask gives new ones (never mkdtemp's 0700, nor a
    writer's 0600)."""
    umask = current_umask()
    try:
        folder = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        folder = 0o777 & ~umask

    def file_mode(name: str) -> int:
        try:
            return stat.S_IMODE((target / name).stat().st_mode)
        except OSError:
            return 0o666 & ~umask

    return folder, file_mode


def write_artifact(target: str | Path, write_files: Callable[[Path], dict], meta: dict) -> Path:
    """``write_files(tmp_dir)`` writes the payload; the manifest and the rename are done here.
    Only an ehi artifact (or an empty folder) is ever replaced."""
    target = check_target(target, overwrite=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    folder_mode, file_mode = _modes(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        extra = write_files(tmp) or {}
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, file_mode(f.name))
            files[f.name] = sha256_file(f)
        manifest = seal_manifest({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ehi_version": __version__,
            "files": files,
            **meta,
            **extra,
        })
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp / MANIFEST, file_mode(MANIFEST))
        os.chmod(tmp, folder_mode)
        _fsync_dir(tmp)
        if target.exists() and _exchange(tmp, target):
            # one atomic step: the path holds the complete old model, then the complete new one
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old model
            return target
        old = None
        if target.exists():  # no atomic exchange here: a crash between the renames is repaired by the next save
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(path: str | Path, verify: bool = True, required: tuple[str, ...] = ()) -> dict:
    """The manifest, checked: our format, a known version, every listed file present, a regular
    file and matching its checksum, and every ``required`` file listed (an empty or pruned
    list must not switch the checks off)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: not an ehi model directory (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not an ehi model manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{mpath}: format_version must be a positive integer, got {json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format version {version} is newer than this ehi ({FORMAT_VERSION}); upgrade ehi")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ArtifactError(f"{mpath}: 'files' must map file names to sha256 digests")
    missing = [name for name in required if name not in files]
    if missing:
        raise ArtifactError(f"{mpath}: does not list {', '.join(missing)}")
    # format 1 (before the values were checksummed) is read as it was written
    if version >= 2 and manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        raise ArtifactError(f"{mpath}: its values do not match its checksum (edited or corrupted); restore the model or save it anew")
    if verify:
        for name, digest in files.items():
            f = path / name
            if Path(name).name != name:
                raise ArtifactError(f"{mpath}: file name {name!r} is not inside the model folder")
            if not f.exists():
                raise ArtifactError(f"{f}: missing file listed in the manifest")
            if not f.is_file():
                raise ArtifactError(f"{f}: not a regular file")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{f}: checksum mismatch (file corrupted or truncated)")
    return manifest
