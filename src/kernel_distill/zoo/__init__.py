"""The distilled-set zoo: ready-made sets shipped with the library, with numbers anyone can re-measure.

Every set is a kernel-distill ``.npz`` file (docs/FORMAT.md) in ``kernel_distill/zoo/sets/``, described by
one entry of ``kernel_distill/zoo/index.json``::

    {"name": "mnist-kip-fc-10ipc", "file": "sets/mnist-kip-fc-10ipc.npz", "sha256": "...", "bytes": 318122,
     "dataset": "mnist", "lossy": false, "method": "kip", "labels": "learned", "per_class": 10,
     "support_size": 100, "kernel": {...KernelSpec...}, "get": "ntk", "reg": 1e-06,
     "preprocessing": "standardised per channel", "selection": {"split": "validation", "step": 4250, ...},
     "krr": {"test_accuracy": 0.97, "num_test": 10000, "dtype": "float32"},
     "transfer": {"model": "evalnet", "steps": 300, ..., "mean": 0.81, "std": 0.02, "accuracies": [...]},
     "published": {"accuracy": 0.972, "what": "KIP-FC, Nguyen et al., ICLR 2021"} | null,
     "command": "kernel-distill kip ...", "wall_seconds": 612.0, "machine": "...", "date": "...",
     "git_commit": "...", "added_with": "python tools/zoo_add.py ..."}

Accuracies are fractions in [0, 1], as in result records. ``krr.test_accuracy`` is what
:func:`kernel_distill.workflows.zoo.evaluate_file` measures (the KRR kernel recorded in the file, on the
whole test set); the test suite re-measures it for every set. Entries are added by ``tools/zoo_add.py`` (never by hand).

A name ``zoo:NAME`` is accepted wherever a distilled-set path is (:func:`resolve`); the file's sha256 is
checked every time it is opened. An entry may also carry a ``url`` instead of a packaged file: it is then
downloaded once into ``<data dir>/zoo/`` through :func:`kernel_distill.data.fetch` (the one download
mechanism, pooch), against the same sha256.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import TYPE_CHECKING, overload

from kernel_distill.checksums import file_sha256
from kernel_distill.errors import KernelDistillError

if TYPE_CHECKING:
    from kernel_distill.io import DistilledSet

ZOO_DIR = pathlib.Path(__file__).resolve().parent
INDEX_FILE = ZOO_DIR / "index.json"
PREFIX = "zoo:"


def read_index(path: str | os.PathLike | None = None) -> list[dict]:
    """The zoo's entries, in index order (``path``: another index file, for tools and tests)."""
    path = pathlib.Path(path) if path is not None else INDEX_FILE
    if not path.is_file():
        return []
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KernelDistillError(f"{path}: the zoo index is not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("sets"), list):
        raise KernelDistillError(f"{path}: the zoo index must be an object with a 'sets' list")
    return index["sets"]


def names() -> list[str]:
    """The zoo's set names, in index order."""
    return [entry["name"] for entry in read_index()]


def entry(name: str) -> dict:
    """The index entry of ``name``, or of the set that was called ``name`` before (its ``aliases``: a renamed
    set keeps answering to its former names); a clear error listing the known names otherwise."""
    for e in read_index():
        if e["name"] == name:
            return e
    for e in read_index():
        if name in e.get("aliases", ()):
            return e
    known = ", ".join(names()) or "(the zoo is empty)"
    raise KernelDistillError(f"no zoo set named {name!r}; known: {known} (kernel-distill zoo list)")


def path(name: str, data_dir: str | os.PathLike | None = None, progress: bool = True) -> pathlib.Path:
    """The local file of zoo set ``name``, its sha256 checked against the index.

    A packaged set is read in place; an entry with a ``url`` is downloaded once into ``<data dir>/zoo/``.
    """
    e = entry(name)
    local = ZOO_DIR / e["file"]
    if not local.is_file() and e.get("url"):
        from kernel_distill.data import fetch, resolve_data_dir

        local = fetch(e["url"], f"sha256:{e['sha256']}", resolve_data_dir(data_dir) / "zoo",
                      pathlib.PurePosixPath(e["file"]).name, progress=progress)
    if not local.is_file():
        raise KernelDistillError(f"zoo set {name}: its file {local} is missing from this installation "
                                 f"(reinstall kernel-distill)")
    actual = file_sha256(local)
    if actual != e["sha256"]:
        raise KernelDistillError(f"zoo set {name}: {local} has sha256 {actual}, the index says {e['sha256']}; "
                                 f"the file is corrupt or was changed (reinstall kernel-distill)")
    return local


@overload
def resolve(text: str, data_dir: str | os.PathLike | None = ..., progress: bool = ...) -> str: ...
@overload
def resolve(text: os.PathLike, data_dir: str | os.PathLike | None = ..., progress: bool = ...) -> os.PathLike: ...
@overload
def resolve(text: None, data_dir: str | os.PathLike | None = ..., progress: bool = ...) -> None: ...


def resolve(text: str | os.PathLike | None, data_dir: str | os.PathLike | None = None,
            progress: bool = True) -> str | os.PathLike | None:
    """``zoo:NAME`` -> the verified local path of that set; any other path is returned unchanged.

    The one place where the command line turns a distilled-set argument into a file.
    """
    if isinstance(text, str) and text.startswith(PREFIX):
        return str(path(text[len(PREFIX):], data_dir, progress))
    return text


def load(name: str, data_dir: str | os.PathLike | None = None) -> DistilledSet:
    """The :class:`~kernel_distill.io.DistilledSet` of zoo set ``name`` (checksum verified; a ZCA stored as its
    recipe is recomputed from ``data_dir``'s training split, once, then cached)."""
    from kernel_distill.io import load_distilled

    return load_distilled(path(name, data_dir), data_dir)


# ----------------------------------------------------------------------------------------------------
# Presentation: the command line's list and the README's table come from the index alone.

DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (lossy JPEG copy)"}
METHOD_NAMES = {"kip": "KIP", "label_solve": "Label Solve"}


def _pct(value, std=None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + (f" +- {100 * std:.2f}" if std is not None else "")


def describe_method(e: dict) -> str:
    """The method column of an entry, e.g. ``KIP FC NTK, learned labels``."""
    kernel = e.get("kernel", {})
    arch = {"convnet": "ConvNet", "convnet3": "ConvNet3"}.get(kernel.get("architecture"), str(kernel.get(
        "architecture", "?")).upper())
    features = kernel.get("random_features")
    kind = f"random-feature {e.get('get', 'ntk').upper()} ({features['models']}x{features['width']}" \
        f"{', ' + features['norm'] + ' norm' if features.get('norm', 'none') != 'none' else ''})" if features \
        else e.get("get", "ntk").upper()
    text = f"{METHOD_NAMES.get(e['method'], e['method'])} {arch} {kind}"
    if e["method"] == "kip":
        text += f", {e.get('labels', '?')} labels"
    return text


def _storage(e: dict) -> str:
    storage = e.get("storage")
    if not storage:
        return "-"
    return f"{(storage['image_bytes'] + storage['label_bytes']) / 1000:,.0f} kB"


def _compute(e: dict) -> str:
    seconds = e.get("wall_seconds")
    if seconds is None:
        return "-"
    machine = str(e.get("machine", "")).lower()
    # zoo_add records the JAX backend in brackets: "(cpu)" or "(gpu)"; anything else is said in `zoo show`
    where = "GPU" if "(gpu)" in machine else "CPU" if "(cpu)" in machine else "mixed CPU + GPU"
    return f"{seconds / 60:,.1f} min, {where}"


def _points(value) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def _krr_cell(krr: dict) -> str:
    """KRR % of the whole test split, or of the first ``test_limit`` test images where the entry says so."""
    if krr.get("test_limit") is None:
        return _pct(krr["test_accuracy"])
    return f"{_pct(krr['test_accuracy'])} (first {krr['num_test']:,} test images)"


def table_rows(entries: list[dict] | None = None) -> list[list[str]]:
    """One row per set: name, dataset, method, per class, KRR %, transfer %, the DD-Ranking columns (gain over
    random, hard / soft labels, LRS and ARS: ``-`` where not measured), storage, compute, published %."""
    rows = []
    for e in read_index() if entries is None else entries:
        transfer = e.get("transfer") or {}
        published = e.get("published") or {}
        ranking = e.get("ranking") or {}
        acc = ranking.get("accuracies", {})
        pub = _pct(published.get("accuracy")) + (f" ({published['what']})" if published.get("what") else "") \
            if published.get("accuracy") is not None else "-"
        hard_soft = f"{_pct(acc.get('set_hard'))} / {_pct(acc.get('set'))}" if acc else "-"
        rows.append([f"`{e['name']}`", DATASET_NAMES.get(e["dataset"], e["dataset"]), describe_method(e),
                     str(e["per_class"]), _krr_cell(e["krr"]),
                     _pct(transfer.get("mean"), transfer.get("std")) if transfer else "-",
                     _points(ranking.get("ior")), hard_soft, _pct(ranking.get("lrs")), _pct(ranking.get("ars")),
                     _storage(e), _compute(e), pub])
    return rows


TABLE_HEADER = ["name", "dataset", "method", "per class", "KRR %", "transfer %", "gain over random (IOR, points)",
                "hard / soft labels %", "LRS %", "ARS %", "storage", "compute to make", "published %"]


def markdown_table(entries: list[dict] | None = None) -> str:
    """The README's zoo table (Markdown), from the index or ``entries``."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(entries)]
    return "\n".join(lines) + "\n"

