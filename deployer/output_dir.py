"""Output folders that are safe to replace: a manifest of what deploy wrote, checks before any model work,
and an atomic write (temporary folder beside the output, then rename).

Every output folder (``deploy``, ``deploy verify``, ``deploy distill``) carries ``.deployer-manifest.json``::

    {"tool": "deployer", "version": "0.1.0", "files": ["plan.json", "tensorrt/model.onnx", ...],
     "dirs": ["tensorrt"]}

listing exactly the files and folders the tool wrote (relative POSIX paths). ``--overwrite`` replaces
a folder only when its manifest is there and every entry of the folder is in it; anything else (a
user's document, a folder written by someone else or by a version without manifests, a read-only
folder) is refused with one line and left exactly as it was (issue 22: ``--overwrite`` on a folder
holding a ``plan.json`` and a user's ``thesis.docx`` deleted the document).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deployer import __version__
from deployer.errors import BadInputError

MANIFEST = ".deployer-manifest.json"
TOOL = "deployer"

__all__ = ["MANIFEST", "check_output_dir", "atomic_output", "write_manifest", "add_to_manifest", "foreign_entries",
           "check_writable_parent", "check_plan_output"]


def _entries(root: Path) -> tuple[set[str], set[str]]:
    """(files, folders) under ``root`` as relative POSIX paths; symlinks count as files (never followed)."""
    files: set[str] = set()
    dirs: set[str] = set()
    def unreadable(e: OSError) -> None:
        raise BadInputError(f"cannot list {e.filename} ({e.strerror}); deploy replaces only folders it can read "
                            f"completely: fix the permissions or choose another --out")

    for here, dnames, fnames in os.walk(root, followlinks=False, onerror=unreadable):
        rel = Path(here).relative_to(root)
        for d in list(dnames):
            p = Path(here) / d
            if p.is_symlink():
                files.add((rel / d).as_posix())
                dnames.remove(d)
            else:
                dirs.add((rel / d).as_posix())
        files.update((rel / f).as_posix() for f in fnames)
    files.discard(MANIFEST)
    return files, dirs


def write_manifest(root: Path) -> Path:
    """Write ``root/.deployer-manifest.json`` listing every file and folder now under ``root``.

    Call it only on a folder this process filled (the temporary folder of :func:`atomic_output`).
    """
    files, dirs = _entries(root)
    path = root / MANIFEST
    path.write_text(json.dumps({"tool": TOOL, "version": __version__, "files": sorted(files), "dirs": sorted(dirs)},
                               indent=1) + "\n", encoding="utf-8")
    return path


def add_to_manifest(root: Path, relative: Sequence[str | Path]) -> None:
    """Record files and folders this process added to an output it wrote (e.g. ``distill/`` moved in).

    Each path (relative to ``root``) is recorded with everything under it and its parent folders.
    """
    m = _read_manifest(root)
    if m is None:
        raise BadInputError(f"{root} has no readable {MANIFEST}; it was not written by deploy")
    files, dirs = set(m["files"]), set(m["dirs"])
    for r in relative:
        p = root / r
        rel = Path(r)
        for parent in list(rel.parents)[:-1]:
            dirs.add(parent.as_posix())
        if p.is_dir() and not p.is_symlink():
            dirs.add(rel.as_posix())
            sub_files, sub_dirs = _entries(p)
            files.update((rel / f).as_posix() for f in sub_files)
            if (p / MANIFEST).is_file():  # a nested output's own manifest
                files.add((rel / MANIFEST).as_posix())
            dirs.update((rel / d).as_posix() for d in sub_dirs)
        else:
            files.add(rel.as_posix())
    m.update(files=sorted(files), dirs=sorted(dirs))
    (root / MANIFEST).write_text(json.dumps(m, indent=1) + "\n", encoding="utf-8")


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(m, dict) and m.get("tool") == TOOL and isinstance(m.get("files"), list)
            and isinstance(m.get("dirs", []), list)):
        return None
    return {"tool": TOOL, "version": m.get("version"), "files": [str(f) for f in m["files"]],
            "dirs": [str(d) for d in m.get("dirs", [])]}


def foreign_entries(root: Path) -> tuple[bool, list[str]]:
    """Whether ``root`` has a deploy manifest, and the entries under it that the manifest does not list."""
    m = _read_manifest(root)
    files, dirs = _entries(root)
    if m is None:
        return False, sorted(files | dirs)
    return True, sorted((files - set(m["files"])) | (dirs - set(m["dirs"]) - set(m["files"])))


def _read_only(root: Path) -> Path | None:
    """The first folder under (and including) ``root`` without the owner's write bit, if any."""
    for here, dnames, _ in os.walk(root, followlinks=False):
        if not os.lstat(here).st_mode & stat.S_IWUSR:
            return Path(here)
        dnames[:] = [d for d in dnames if not (Path(here) / d).is_symlink()]
    return None


def check_writable_parent(out: Path, what: str = "--out") -> None:
    """Probe that ``out`` can be created: its nearest existing ancestor is a folder we can write in.

    A temporary folder is created there and removed at once (root ignores permission bits, so only
    a real write tells).

    Raises:
        BadInputError: the ancestor is a file, or a folder we cannot write in (read-only file system,
            permissions).
    """
    anc = Path(os.path.abspath(out)).parent
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise BadInputError(f"cannot write {out}: {anc} is a file, not a folder; choose a writable {what}")
    try:
        Path(tempfile.mkdtemp(prefix=".deployer-probe-", dir=anc)).rmdir()
    except OSError as e:
        raise BadInputError(f"cannot write to {anc} ({e.strerror}); choose a writable {what}") from None


def check_output_dir(out_dir: Path, overwrite: bool, protected: Sequence[Any] = ()) -> None:
    """Refuse an output folder that must not be written or replaced; touches nothing.

    Runs before any model work (a refusal never costs a calibration).

    Raises:
        BadInputError: it is the current folder or one of its parents, would swallow a given input
            (model, calibration data), exists (without ``overwrite``), is not a folder, holds anything
            deploy's manifest does not list (or has no manifest), is read-only, or its parent cannot
            be written.
    """
    out_dir = Path(out_dir)
    resolved = _resolved(out_dir)
    if resolved is None:
        raise BadInputError(f"output {out_dir} is a symlink loop, not a directory; remove it or choose another --out")
    cwd = Path.cwd().resolve()
    if str(out_dir) in ("", ".") or resolved == cwd or resolved in cwd.parents:
        raise BadInputError(f"--out {str(out_dir)!r} is the current directory or one of its parents; "
                            f"choose a new directory such as deploy-out")
    for p in protected:
        if isinstance(p, (str, Path)) and str(p):
            src = _resolved(Path(p))  # None: a symlink loop, refused by the input's own check
            if src is not None and (src == resolved or resolved in src.parents):
                raise BadInputError(f"--out {out_dir} contains the input {p}; replacing it would delete your data; "
                                    f"choose another --out")
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise BadInputError(f"output directory {out_dir} exists; pass --overwrite or choose another --out")
        if out_dir.is_symlink() or not out_dir.is_dir():
            raise BadInputError(f"output {out_dir} exists and is not a directory; remove it or choose another --out")
        ours, foreign = foreign_entries(out_dir)
        if foreign and not ours:
            raise BadInputError(f"--overwrite refuses to replace {out_dir}: it is not empty and is not a deploy output "
                                f"(no {MANIFEST}; it holds {_shown(foreign)}); move your files or choose another --out")
        if foreign:
            raise BadInputError(f"--overwrite refuses to replace {out_dir}: it holds {_shown(foreign)}, which deploy "
                                f"did not write; move them out or choose another --out")
        ro = _read_only(out_dir)
        if ro is not None:
            raise BadInputError(f"--overwrite refuses to replace {out_dir}: {ro} is read-only; make it writable "
                                f"(chmod -R u+w {out_dir}) or choose another --out")
    check_writable_parent(out_dir)


def _resolved(p: Path) -> Path | None:
    try:
        return p.resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
        return None


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(repr(n) for n in names[:3]) + more


def check_plan_output(out: Path, overwrite: bool) -> None:
    """``deploy plan --out FILE``: refuse before any model work an existing file (without ``overwrite``),
    a folder, a file that is not a deploy plan (``--overwrite`` replaces only plans), or an unwritable place.

    Raises:
        BadInputError: the first problem found.
    """
    if out.is_dir():
        raise BadInputError(f"{out} is a directory; give a file path for the plan (--out FILE)")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise BadInputError(f"{out} exists; pass --overwrite or choose another path")
        try:
            d = json.loads(out.read_text(encoding="utf-8"))
            is_plan = isinstance(d, dict) and {"schema_version", "nodes", "ranges"} <= set(d)
        except (OSError, ValueError):
            is_plan = False
        if out.is_symlink() or not is_plan:
            raise BadInputError(f"--overwrite refuses to replace {out}: it is not a plan written by deploy; move it or "
                                f"choose another --out")
    try:
        check_writable_parent(out)
    except BadInputError as e:
        raise BadInputError(f"cannot write the plan to {out}: {e}") from None


@contextmanager
def atomic_output(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success write the manifest into it and
    rename it to ``out_dir`` (the previous output, checked again just before, is moved aside first and
    deleted after).

    On any exception, SIGINT or SIGTERM the temporary directory is removed and ``out_dir`` is untouched.

    Raises:
        BadInputError: :func:`check_output_dir` refuses ``out_dir`` (at the start or just before the
            rename), or its parent is not writable.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise BadInputError(f"cannot write to {parent} ({e.strerror}); choose a writable --out") from None
    tmp.chmod(0o755)  # mkdtemp creates 0700; the output is meant to be shared
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    import threading

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    old: Path | None = None  # a replaced output waits here until the new one is in place
    try:
        yield tmp
        write_manifest(tmp)
        check_output_dir(out_dir, overwrite)  # again: a file dropped in meanwhile is never deleted
        if out_dir.exists():
            old = parent / f".{out_dir.name}.tmp-old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # interrupted between the renames: the previous output comes back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
