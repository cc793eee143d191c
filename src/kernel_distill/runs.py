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
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator, overload

from kernel_distill.errors import KernelDistillError

LOCK_NAME = ".kernel-distill.lock"
HISTORY_NAME = "config_history.jsonl"
TEMP_SUFFIX = ".tmp"

# This process's held locks: resolved folder -> [file object, depth].
_HELD: dict[pathlib.Path, list[Any]] = {}


def describe_os_error(e: OSError, action: str = "cannot write", path: str | os.PathLike | None = None) -> str:
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
def _folder_lock(folder: pathlib.Path) -> Iterator[bool]:
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
        handle: IO[str] = open(lock_path, "a+")
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
                     run_files: tuple[str, ...] = (), run_folders: tuple[str, ...] = (), option: str = "--out",
                     command: str | None = None, resumable: bool = True) -> Iterator[pathlib.Path]:
    """Own ``folder`` for one run while the ``with`` block runs.

    A new run (``resume=False``) needs an empty or missing folder; with ``overwrite`` the files named in
    ``run_files`` and the folders in ``run_folders`` (and the config history) are deleted first, anything else
    is left alone; given ``command``, a folder holding another command's run is refused even then. A resumed run
    needs the folder to exist. Either way the folder is tested for writing, locked, and cleared of stale
    temporary files. Yields the folder as a ``pathlib.Path``.
    """
    run_dir = check_output_path(folder, "--resume" if resume else option)
    if resume:
        if not run_dir.is_dir():
            raise KernelDistillError(f"cannot resume: {run_dir} is not a folder")
    elif run_dir.resolve() not in _HELD:
        if not overwrite:
            _refuse_if_not_empty(run_dir, option, resumable)
        elif command is not None and run_dir.is_dir():
            _refuse_other_owner(run_dir, command, option)
    created = not run_dir.exists()
    ensure_writable_folder(run_dir)
    with _folder_lock(run_dir) as outermost:
        try:
            if outermost:
                remove_stale_temp_files(run_dir)
                if not resume:
                    if overwrite:
                        for name in (*run_files, HISTORY_NAME):
                            (run_dir / name).unlink(missing_ok=True)
                        for name in run_folders:
                            if (run_dir / name).is_dir() and not (run_dir / name).is_symlink():
                                shutil.rmtree(run_dir / name)
                    else:
                        _refuse_if_not_empty(run_dir, option, resumable)  # one that finished since the check
            yield run_dir
        except BaseException:
            if outermost and created and not _visible_contents(run_dir):
                # A run refused before it wrote anything leaves no trace (the lock is still held here).
                (run_dir / LOCK_NAME).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise


# What each command writes into its folder. ``--overwrite`` replaces only these files of an earlier run of
# the same command; a folder that holds another command's run is never touched.
OUTPUT_FILES = {
    "kip": ("config.json", "checkpoint.npz", "metrics.jsonl", "distilled.npz", "distilled_best.npz", "grid.png",
            "curve.png", "results.json"),
    "label-solve": ("distilled.npz", "label_covariance.png", "results.json", "label_solve_config.json",
                    "label_solve_checkpoint.npz"),
    "evaluate": ("results.json",),
    "baseline": ("natural.npz", "results.json"),
    "transfer": ("transfer_curve.png", "results.json"),
    "report": ("index.html", "runs", "img"),
    "export": ("export.json", "labels.csv", "preprocessing.safetensors", "train", "data"),
}
STAGED_COMMANDS = ("report",)
# Files only a KIP run writes: a folder holding one is a KIP run even without its results.json.
_KIP_MARKERS = ("checkpoint.npz", "config.json", "metrics.jsonl")
# Files only a Label Solve run writes (an interrupted one has no results.json yet).
_LABEL_SOLVE_MARKERS = ("label_solve_config.json", "label_solve_checkpoint.npz")


def folder_owner(folder: str | os.PathLike) -> str | None:
    """The command whose run (or report) ``folder`` holds, or ``None`` for a folder of other files.

    Read from ``results.json``'s ``command`` (``demo`` runs are ``kip`` runs), else from the files only one
    command writes (a KIP checkpoint, a report's ``index.html``).
    """
    folder = pathlib.Path(folder)
    results = folder / "results.json"
    if results.is_file():
        try:
            command = json.loads(results.read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            command = None
        if isinstance(command, str) and command:
            return command
        return "an unknown command"  # a results.json nobody can read is still somebody's
    if any((folder / name).exists() for name in _LABEL_SOLVE_MARKERS):
        return "label-solve"
    if any((folder / name).exists() for name in (*_KIP_MARKERS, HISTORY_NAME)):
        return "kip"
    if (folder / "index.html").is_file():
        return "report"
    return None


@overload
def check_output_path(path: str | os.PathLike, option: str = ...) -> pathlib.Path: ...
@overload
def check_output_path(path: None, option: str = ...) -> None: ...


def check_output_path(path: str | os.PathLike | None, option: str = "--out") -> pathlib.Path | None:
    """Refuse an empty path and a symbolic link that points nowhere, with one line each."""
    if path is None:
        return None
    if str(path).strip() == "":
        raise KernelDistillError(f"{option} is empty: give a folder name (use {option} . for the current folder)")
    path = pathlib.Path(path)
    if path.is_symlink() and not path.exists():
        raise KernelDistillError(f"{option} {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    return path


def claim_output_folder(folder: str | os.PathLike, command: str, *, overwrite: bool = False,
                        option: str = "--out") -> contextlib.AbstractContextManager[pathlib.Path]:
    """Own ``folder`` for one run of ``command`` (label-solve, evaluate, baseline, transfer, report): the same
    rules as a KIP run folder.

    A missing or empty folder is created, tested for writing and locked before any computation. A non-empty
    one is refused unless ``overwrite``; with ``overwrite`` only an earlier run of the same ``command`` (or a
    folder of unrelated files) is accepted, and only ``command``'s own files (:data:`OUTPUT_FILES`) are
    deleted: another command's run (a KIP run above all) is refused whatever the options.
    """
    path = check_output_path(folder, option)
    if overwrite and path.is_dir() and path.resolve() not in _HELD:
        _refuse_other_owner(path, command, option)
    # A report replaces its files itself, whole, once it is built (report._staged): a failed build keeps the
    # earlier report. The other commands start from a folder cleared of their earlier outputs, as kip does.
    own = () if command in STAGED_COMMANDS else OUTPUT_FILES.get(command, ())
    return claim_run_folder(path, overwrite=overwrite, run_files=tuple(n for n in own if "." in n),
                            run_folders=tuple(n for n in own if "." not in n), option=option, resumable=False)


def _refuse_other_owner(folder: pathlib.Path, command: str, option: str) -> None:
    owner = folder_owner(folder)
    family = {"demo": "kip"}
    if owner is not None and family.get(owner, owner) != family.get(command, command):
        raise KernelDistillError(
            f"{option} {folder} holds {_article(owner)} {owner} run; --overwrite replaces only an earlier {command} "
            f"run's outputs and never another command's: choose another folder")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@contextlib.contextmanager
def claim_output_file(path: str | os.PathLike, *, overwrite: bool = False,
                      option: str = "PATH") -> Iterator[pathlib.Path]:
    """Own one output file (``zoo export``, ``export``) while the ``with`` block writes it.

    An existing file is refused unless ``overwrite``; a file of a run folder (one that holds a run's
    ``results.json`` or checkpoint) is refused even then, and so is any path in a folder a live run has
    locked. A folder that was never a run folder gets no lock file of ours. Yields the path.
    """
    target = check_output_path(path, option)
    if target.is_dir():
        raise KernelDistillError(f"{option} {target} is a folder; give a file path")
    folder = target.parent
    if target.exists():
        if not overwrite:
            raise KernelDistillError(f"{option} {target} exists: choose another path or replace it with --overwrite")
        owner = folder_owner(folder)
        if owner is not None:
            raise KernelDistillError(f"{option} {target} belongs to the {owner} run in {folder}; --overwrite never "
                                     f"replaces a run's files: choose another path")
    if (folder / LOCK_NAME).is_file():
        with _folder_lock(folder):
            yield target
    else:
        ensure_writable_folder(folder)
        yield target


def _refuse_if_not_empty(folder: pathlib.Path, option: str, resumable: bool = True) -> None:
    contents = _visible_contents(folder)
    if contents:
        shown = ", ".join(contents[:6]) + (f" and {len(contents) - 6} more" if len(contents) > 6 else "")
        resume = f"continue the run there with --resume {folder}, " if resumable else ""
        raise KernelDistillError(f"{option} {folder} is not empty (it holds {shown}): choose a new folder, "
                                 f"{resume}or replace it with --overwrite")


# ----------------------------------------------------------------------------------------------------
# Strict resume.


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(saved: dict, requested: dict, allowed: frozenset[str] | set[str],
                   flag_of: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")
                   ) -> dict[str, list[Any]]:
    """Compare two config dicts; return ``{field: [saved, requested]}`` of the allowed changes.

    Every other difference (a field added, removed or changed, nested dicts compared key by key) raises
    :class:`KernelDistillError` naming the option (``flag_of(field)``) and both values.
    """
    before, after = _flatten(saved), _flatten(requested)
    changes: dict[str, list[Any]] = {}
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
                   config: dict | None = None, **extra: Any) -> dict:
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


def read_json_lines(path: str | os.PathLike) -> list[dict]:
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


def read_history(folder: str | os.PathLike) -> list[dict]:
    return read_json_lines(pathlib.Path(folder) / HISTORY_NAME)
