"""Staging folders next to an output folder: written in full, then renamed into place.

An export writes into ``.NAME.tmp-XXXX`` beside ``NAME`` and renames it over ``NAME`` when it is
complete, so a reader never sees a half-written model. Each staging folder records its owner (host
and process id) in :data:`OWNER_FILE`; a later run on the same host removes the staging folders of
owners that are no longer alive (a job killed by SIGKILL, a time limit or the OOM killer cannot clean
up after itself) and names any it cannot judge. Nothing else beside ``NAME`` is ever touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

__all__ = ["OWNER_FILE", "make_staging_dir", "remove_stale_staging", "replace_folder"]

#: File inside a staging folder naming the process that writes it (removed before the rename).
OWNER_FILE = ".eaopd_staging_owner.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` folders beside ``out`` whose owner process on this host is gone.

    Returns the staging folders left in place (a live owner, another host, or no owner file): the
    caller may mention them. Never raises for a folder it cannot read.
    """
    kept = []
    for d in sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        if not d.is_dir():
            continue
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
            dead = owner["host"] == socket.gethostname() and not _alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            dead = False
        if dead:
            shutil.rmtree(d, ignore_errors=True)
        else:
            kept.append(d)
    return kept


def _own(d: Path) -> Path:
    (d / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")
    return d


def make_staging_dir(out: Path) -> Path:
    """A new, owned, empty staging folder ``.NAME.tmp-XXXX`` beside ``out`` with a plain mkdir's permissions."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # not mkdtemp's 0700
    return _own(tmp)


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the complete staging folder ``tmp`` at ``out``; a previous folder there (checked by the caller) is
    moved aside first and deleted only once the new one is in place (put back if the rename fails)."""
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    if not out.exists():
        os.replace(tmp, out)
        return
    # onto the empty folder mkdtemp made; with no owner file, a kill before the next rename leaves the previous
    # folder there for the user (remove_stale_staging names it, never deletes it)
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
