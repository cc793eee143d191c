"""Run folders that never lose or mix work: ownership, an OS lock, output checks, strict resume, history.

A run folder belongs to one run:

* A new run refuses a folder that already holds something (unless ``overwrite``), so a finished run is
  never replaced or mixed with a new one by accident.
* A live run holds an exclusive ``fcntl.flock`` on ``.kernel-distill.lock`` in the folder. The kernel
  releases it when the process ends, however it ends (``kill -9`` included), so a stale lock never blocks
  a later run; a second run on a held folder is refused with the holder's pid. The lock is re-entrant
  within one process (the CLI claims the folder before it loads data, then the library claims it again).
* The folder is created and tested for writing before any computation; an ``OSError`` becomes a
  :class:`KernelDistillError` naming the path.
* Temporary files left by a killed atomic write (``.NAME.XXXX.tmp``) are removed when a run claims the
  folder (under the lock, so never while another live run writes them).

Strict resume: :func:`resume_changes` compares every field of a saved config with the requested one
(generically, over the config's ``to_dict()``, so new fields are covered automatically) and refuses any
change outside an explicit allow-list; the allowed changes are appended to ``config_history.jsonl``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import tempfile

from kernel_distill.errors import KernelDistillError

LOCK_NAME = ".kernel-distill.lock"
HISTORY_NAME = "config_history.jsonl"
TEMP_SUFFIX = ".tmp"

# This process's held locks: resolved folder -> [file object, depth].
_HELD: dict[pathlib.Path, list] = {}


def describe_os_error(e: OSError, action: str = "cannot write", path=None) -> str:
    """One line for an ``OSError``: what failed, on which path, and why (``No space left on device``)."""
    where = path if path is not None else (e.filename if e.filename is not None else None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{action} {where}: {reason}" if where is not None else f"{action}: {reason}"


def ensure_writable_folder(path: str | os.PathLike, what: str = "output folder") -> pathlib.Path:
    """Create ``path`` (and parents) and prove a file can be written in it; one-line error otherwise."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise KernelDistillError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=TEMP_SUFFIX, dir=path)
        os.close(fd)
        pathlib.Path(probe).unlink(missing_ok=True)  # a run claiming the folder may have cleaned it up
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            raise KernelDistillError(f"cannot create {what} {path}: a parent of it is a file") from None
        raise KernelDistillError(describe_os_error(e, f"cannot write to {what}", path)) from None
    return path


def remove_stale_temp_files(folder: pathlib.Path) -> list[str]:
    """Delete ``.NAME.XXXX.tmp`` files left by an interrupted atomic write. Call only under the lock."""
    removed = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _visible_contents(folder: pathlib.Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir()
                  if e.name != LOCK_NAME and not (e.name.startswith(".") and e.name.endswith(TEMP_SUFFIX)))


def _lock_holder(lock_path: pathlib.Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def _folder_lock(folder: pathlib.Path):
    key = folder.resolve()
    if key in _HELD:  # re-entrant within this process
        _HELD[key][1] += 1
        try:
            yield False
        finally:
            _HELD[key][1] -= 1
        return
    lock_path = folder / LOCK_NAME
    try:
        handle = open(lock_path, "a+")
    except OSError as e:
        raise KernelDistillError(describe_os_error(e, "cannot create the lock file", lock_path)) from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise KernelDistillError(f"{folder} is in use by another kernel-distill run (pid "
                                     f"{_lock_holder(lock_path)}); wait for it to finish or choose another "
                                     f"folder") from None
        raise KernelDistillError(describe_os_error(e, "cannot lock", lock_path)) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError:
        pass  # the pid is only informative; the lock itself is held
    _HELD[key] = [handle, 1]
    try:
        yield True
    finally:
        del _HELD[key]
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


@contextlib.contextmanager
def claim_run_folder(folder: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                     run_files: tuple[str, ...] = (), option: str = "--out"):
    """Own ``folder`` for one run while the ``with`` block runs.

    A new run (``resume=False``) needs an empty or missing folder; with ``overwrite`` the files named in
    ``run_files`` (and the config history) are deleted first, anything else is left alone. A resumed run
    needs the folder to exist. Either way the folder is tested for writing, locked, and cleared of stale
    temporary files. Yields the folder as a ``pathlib.Path``.
    """
    folder = pathlib.Path(folder)
    if resume:
        if not folder.is_dir():
            raise KernelDistillError(f"cannot resume: {folder} is not a folder")
    elif not overwrite and folder.resolve() not in _HELD:
        _refuse_if_not_empty(folder, option)
    created = not folder.exists()
    ensure_writable_folder(folder)
    with _folder_lock(folder) as outermost:
        try:
            if outermost:
                remove_stale_temp_files(folder)
                if not resume:
                    if overwrite:
                        for name in (*run_files, HISTORY_NAME):
                            (folder / name).unlink(missing_ok=True)
                    else:
                        _refuse_if_not_empty(folder, option)  # a run that finished between the check and the lock
            yield folder
        except BaseException:
            if outermost and created and not _visible_contents(folder):
                # A run refused before it wrote anything leaves no trace (the lock is still held here).
                (folder / LOCK_NAME).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise


def claim_output_folder(folder: str | os.PathLike):
    """For a command that writes a fixed set of files (label-solve, transfer): the folder is created, tested
    for writing and locked before any computation; its previous outputs are replaced, each atomically."""
    return claim_run_folder(folder, overwrite=True)


def _refuse_if_not_empty(folder: pathlib.Path, option: str):
    contents = _visible_contents(folder)
    if contents:
        shown = ", ".join(contents[:6]) + (f" and {len(contents) - 6} more" if len(contents) > 6 else "")
        raise KernelDistillError(f"{option} {folder} is not empty (it holds {shown}): choose a new folder, "
                                 f"continue the run there with --resume {folder}, or replace it with --overwrite")


# ----------------------------------------------------------------------------------------------------
# Strict resume.


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(saved: dict, requested: dict, allowed: frozenset[str] | set[str],
                   flag_of=lambda name: "--" + name.replace("_", "-")) -> dict:
    """Compare two config dicts; return ``{field: [saved, requested]}`` of the allowed changes.

    Every other difference (a field added, removed or changed, nested dicts compared key by key) raises
    :class:`KernelDistillError` naming the option (``flag_of(field)``) and both values.
    """
    before, after = _flatten(saved), _flatten(requested)
    changes = {}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if name in allowed:
            changes[name] = [old, new]
            continue
        raise KernelDistillError(
            f"--resume continues the saved run unchanged: {flag_of(name)} would change {name} from {old!r} to "
            f"{new!r}; only {', '.join(sorted(flag_of(a) for a in allowed))} may change (start a new run instead)")
    return changes


def append_history(folder: pathlib.Path, event: str, step: int, changes: dict | None = None,
                   config: dict | None = None, **extra) -> dict:
    """Append one line to ``config_history.jsonl``: when, at which step, what changed (or the whole config),
    and ``extra`` facts about the session (e.g. ``backend``: where the kernels were computed)."""
    record = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), event=event,
                  step=step, pid=os.getpid())
    if changes is not None:
        record["changes"] = changes
    if config is not None:
        record["config"] = config
    record.update(extra)
    append_line(folder / HISTORY_NAME, json.dumps(record))
    return record


def append_line(path: pathlib.Path, line: str) -> None:
    """Append one line to a log file; a failed write (no space) names the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def read_json_lines(path: pathlib.Path) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file (none if it is missing); a line cut by a kill is skipped, the
    rest stands."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_history(folder: pathlib.Path) -> list[dict]:
    return read_json_lines(pathlib.Path(folder) / HISTORY_NAME)
