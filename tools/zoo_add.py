"""Add (or replace) a set in the distilled-set zoo: one command, every number measured here.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python tools/zoo_add.py RUN_FOLDER_OR_NPZ --name NAME \\
        [--command "kernel-distill kip ..."] [--published 97.2 --published-what "KIP-FC, Nguyen et al. 2021"]

Given a run folder (``results.json`` beside ``distilled_best.npz`` or ``distilled.npz``), the set is the
run's *reported* support (KIP: the one selected on validation), and the command, wall time, machine, date
and commit come from its ``results.json``; given an ``.npz``, ``--command`` is required (and
``--wall-seconds``/``--machine`` say what it cost). Then it

1. copies the file into ``src/kernel_distill/zoo/sets/NAME.npz``, stored as a compressed ``.npz`` of the same
   arrays (the sha256 goes into the index);
2. measures the KRR test accuracy with the kernel recorded in the file
   (:func:`kernel_distill.workflows.zoo.evaluate_file`, the function the test suite re-runs);
3. measures transfer: ``--transfer-model`` (default the evaluation ConvNet ``evalnet``) trained on the set
   for ``--transfer-steps`` (300) with ``--transfer-seeds`` (3) seeds, SGD momentum 0.9, cosine lr (the
   model's default), batch ``--transfer-batch`` (128), MSE on the set's labels, weight decay 5e-4: the
   protocol of docs/BENCHMARKS.md "Transfer to finite networks"; ``--no-transfer`` skips it;
4. writes the entry into ``src/kernel_distill/zoo/index.json`` and regenerates the README's zoo table.

``--compress --name NAME`` rewrites a set already in the zoo as a compressed ``.npz`` of the very same arrays
(the sets added before compression): only its sha256 and bytes change.

``--transfer-only --name NAME`` (no source) measures step 3 alone for a set already in the zoo, on the file as
shipped (its checksum verified first), and replaces only that entry's ``transfer`` field: everything else
about the set, its command, date and validation selection included, stays as it was recorded.

Published numbers known to the package (KIP-FC MNIST, Label Solve with the ConvNet kernel) are filled in
from :data:`PUBLISHED`; ``--published``/``--published-what`` give another (e.g. for a CIFAR-10 set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# (method, kernel architecture, dataset, support size) -> (accuracy %, what it is). Sources as in
# benchmarks/tables.py.
_KIP_FC = "KIP-FC, Nguyen, Chen & Lee, ICLR 2021"
_LS_CONV = "Label Solve with the ConvNet kernel, Nguyen et al., NeurIPS 2021"
PUBLISHED = {
    ("kip", "fc", "mnist", 10): (85.5, _KIP_FC), ("kip", "fc", "mnist", 100): (97.2, _KIP_FC),
    ("kip", "fc", "mnist", 500): (98.4, _KIP_FC),
    ("label_solve", "*", "mnist", 10): (73.4, _LS_CONV), ("label_solve", "*", "mnist", 100): (96.4, _LS_CONV),
    ("label_solve", "*", "mnist", 500): (98.3, _LS_CONV),
    ("label_solve", "*", "fashion_mnist", 10): (65.3, _LS_CONV),
    ("label_solve", "*", "fashion_mnist", 100): (80.8, _LS_CONV),
    ("label_solve", "*", "fashion_mnist", 500): (86.9, _LS_CONV),
    ("label_solve", "*", "cifar10", 100): (46.3, "Label Solve, ConvNet kernel, 100 images, all 50,000 targets, "
                                                 "original CIFAR-10 (Nguyen et al., NeurIPS 2021)"),
    ("label_solve", "*", "cifar10", 500): (69.7, "Label Solve, ConvNet kernel, 500 images, all 50,000 targets, "
                                                 "original CIFAR-10 (Nguyen et al., NeurIPS 2021)"),
}



ZOO_TEST_SUBSET = 1000  # test images of a random-feature set's re-derivation in tests/test_zoo.py
# An exact ConvNet kernel costs O(pixels^2) per pair (~2,000 pairs/s on one CPU core): the zoo's test re-derives
# such a set on as many test images as this many test-support pairs allow (at least 100).
ZOO_TEST_EXACT_CONV_PAIRS = 20_000


def zoo_test_subset(kernel: dict, support_size: int) -> int | None:
    """Test images of the set's re-derivation in tests/test_zoo.py (``limit_test``), or None: the whole split."""
    if kernel.get("random_features"):
        return ZOO_TEST_SUBSET
    if kernel["architecture"] != "fc":
        return max(100, min(ZOO_TEST_SUBSET, ZOO_TEST_EXACT_CONV_PAIRS // support_size // 100 * 100))
    return None


def _krr_from_run(record: dict | None, kernel: dict, get: str) -> dict | None:
    """The whole-test KRR accuracy a Label Solve run measured of this very support and these labels, with the
    kernel, ``get`` and precision the file records (float32): reused instead of a second pass of test kernels
    (an hour for an exact ConvNet kernel on the CPU). None when the run's number is not that number."""
    if not record or record.get("command") != "label-solve" or record["config"].get("float64"):
        return None
    metrics, config = record["metrics"], record["config"]
    if config.get("test_limit") is not None or config["kernel"] != kernel or config.get("get") != get:
        return None
    return dict(test_accuracy=metrics["test_accuracy"], num_test=metrics["num_test"],
                seconds=metrics.get("test_seconds", 0.0), measured_by="the label-solve run (its results.json)")

def _zca_recipe_of(distilled, record, data_dir):
    """The recipe of the set's ZCA: the file's own, else derived from its run's settings (dataset, validation
    images, regulariser) and the training split's checksum here."""
    import numpy as np

    from kernel_distill.checksums import split_checksum
    from kernel_distill.data import load_dataset
    from kernel_distill.zca_recipes import recipe_for

    pre = distilled.preprocessor
    if pre.zca_recipe is not None:
        return pre.zca_recipe
    config = dict(distilled.metadata.get("config") or {})
    if record is not None:
        config.update(record.get("config") or {})
    if "val_size" not in config:
        raise SystemExit("the set records no val_size (the validation images its ZCA left out): give --zca-val-size")
    dataset = distilled.metadata["dataset"]
    raw, labels = load_dataset(dataset, "train", data_dir, progress=False)
    return recipe_for(dataset, split_checksum(raw, labels), int(config["val_size"]), float(config.get("zca_reg", 0.1)),
                      int(np.prod(distilled.images.shape[1:])), pre.zca_layer_norm)


def _store_float16_images(path: pathlib.Path, data_dir) -> str:
    """Rewrite a set file with float16 images (half the bytes of a 50-per-class set); everything measured
    afterwards is measured on these rounded images. Returns the note for the entry."""
    import numpy as np

    from kernel_distill.io import load_distilled, save_distilled

    distilled = load_distilled(path, data_dir)
    with np.load(path, allow_pickle=False) as f:
        as_recipe = "zca_matrix" not in f.files and distilled.preprocessor is not None \
            and distilled.preprocessor.zca_matrix is not None
    save_distilled(path, distilled, zca_as_recipe=as_recipe, image_dtype="float16")
    rounded = load_distilled(path, data_dir).images
    worst = float(np.abs(rounded - distilled.images).max() / np.abs(distilled.images).max())
    note = f"images stored as float16 (largest rounding {worst:.1e} of the largest pixel; every number measured on them)"
    print(note, flush=True)
    return note


def _store_compressed(path: pathlib.Path) -> tuple[int, int]:
    """Rewrite a set file as a compressed ``.npz`` holding the very same arrays (names, dtypes, values and
    metadata checked on the file as written). Returns ``(bytes before, bytes after)``."""
    import numpy as np

    from kernel_distill.atomic import atomic_savez_compressed

    before = path.stat().st_size
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    atomic_savez_compressed(path, **arrays)
    with np.load(path, allow_pickle=False) as f:
        same = sorted(f.files) == sorted(arrays) and all(
            f[name].dtype == arrays[name].dtype and f[name].shape == arrays[name].shape
            and np.array_equal(f[name], arrays[name]) for name in arrays)
    if not same:  # cannot happen with numpy's zip writer; checked because the zoo's numbers hang on it
        raise SystemExit(f"{path}: the compressed file does not read back the same arrays")
    return before, path.stat().st_size


def _compress(args, zoo, parser) -> int:
    """``--compress``: store the shipped file of zoo set ``args.name`` compressed; its arrays, hence every number
    measured on it, stay the same, so only the entry's sha256 and bytes change."""
    index_file, entries, entry, target = _shipped_entry(args, zoo, parser)
    before, after = _store_compressed(target)
    entry.update(sha256=zoo.file_sha256(target), bytes=after)
    _write_index(index_file, entries, regenerate_readme=args.index is None)
    print(f"{args.name}: {before:,} -> {after:,} bytes (same arrays); entry updated in {index_file}")
    return 0


def _store_zca_as_recipe(path: pathlib.Path, record, data_dir, val_size=None) -> str:
    """Rewrite a set file with its ZCA as a recipe, after checking that the recipe gives the file's matrix (to
    float16 rounding where the file stored float16). Returns what was checked, for the entry's note."""
    import dataclasses

    import numpy as np

    from kernel_distill.io import load_distilled, save_distilled
    from kernel_distill.zca_recipes import zca_matrix

    distilled = load_distilled(path, data_dir)
    if distilled.preprocessor is None or distilled.preprocessor.zca_matrix is None:
        return ""
    if val_size is not None:
        distilled = dataclasses.replace(distilled, metadata={**distilled.metadata, "config": {
            **(distilled.metadata.get("config") or {}), "val_size": val_size}})
    recipe = _zca_recipe_of(distilled, record, data_dir)
    stored = distilled.preprocessor.zca_matrix
    refit = zca_matrix(recipe, distilled.preprocessor.mean, distilled.preprocessor.std, data_dir, progress=False)
    scale = float(np.abs(refit).max())
    worst = float(np.abs(refit - stored).max()) / scale
    with np.load(path, allow_pickle=False) as f:
        half = "zca_matrix" in f.files and f["zca_matrix"].dtype == np.float16
        image_dtype = str(f["images"].dtype)
    if worst > (2e-3 if half else 1e-4):
        raise SystemExit(f"{path}: the recipe {recipe.to_dict()} does not give the file's ZCA matrix (largest "
                         f"difference {worst:.2e} of its largest entry): not converted")
    save_distilled(path, dataclasses.replace(distilled, preprocessor=dataclasses.replace(
        distilled.preprocessor, zca_matrix=refit, zca_recipe=recipe)), zca_as_recipe=True, image_dtype=image_dtype)
    checked = (f"ZCA stored as its recipe (dataset {recipe.dataset}, {recipe.val_size} validation images left out, "
               f"zca_reg {recipe.zca_reg:g}, rank {recipe.rank}); the refitted float32 matrix differs from the "
               f"{'float16 ' if half else ''}matrix the file held by at most {worst:.1e} of its largest entry")
    print(checked, flush=True)
    return checked


def _published(method: str, architecture: str, dataset: str, size: int):
    for key in ((method, architecture, dataset, size), (method, "*", dataset, size)):
        if key in PUBLISHED:
            accuracy, what = PUBLISHED[key]
            return dict(accuracy=round(accuracy / 100, 6), what=what)
    return None


def _source(path: pathlib.Path):
    """``(npz path, results record or None)`` of a run folder or an .npz file."""
    from kernel_distill.errors import KernelDistillError
    from kernel_distill.results import read_results

    if path.is_dir():
        record = read_results(path)
        artifacts = record.get("artifacts", {})
        name = artifacts.get("distilled_best") or artifacts.get("distilled")
        if not name or not (path / name).is_file():
            raise KernelDistillError(f"{path}: the run records no distilled set")
        return path / name, record
    if path.suffix == ".npz" and path.is_file():
        return path, None
    raise KernelDistillError(f"{path}: not a run folder nor an .npz file")


def _preprocessing_text(distilled) -> str:
    pre = distilled.preprocessor
    if pre.zca_matrix is not None and pre.zca_recipe is not None:
        return ("standardised per channel, then ZCA-whitened (stored as its recipe: the matrix is refitted from the "
                "training split on first use and cached)")
    if pre.zca_matrix is not None:
        return "standardised per channel, then ZCA-whitened (matrix stored in the file)"
    return "standardised per channel (mean/std of the training split, stored in the file)"


def _transfer(npz: pathlib.Path, args) -> dict:
    from kernel_distill import experiments
    from kernel_distill.finite import TrainConfig, default_learning_rate
    from kernel_distill.io import load_distilled

    distilled = load_distilled(npz)
    config = TrainConfig(steps=args.transfer_steps, learning_rate=default_learning_rate(args.transfer_model),
                         batch_size=args.transfer_batch, eval_every=args.transfer_steps, loss="mse")
    start = time.perf_counter()
    support = experiments.transfer_support(distilled, str(npz), None, None, data_dir=args.data_dir, progress=False,
                                           log=lambda *_: None)
    result = experiments.transfer(support, args.transfer_model, config, args.transfer_seeds, progress=False)
    m = result["metrics"]
    transfer = dict(model=args.transfer_model, steps=config.steps, optimizer="sgd, momentum 0.9, cosine decay",
                    learning_rate=config.learning_rate, batch_size=config.batch_size, weight_decay=config.weight_decay,
                    loss=config.loss, seeds=args.transfer_seeds, mean=m["test_accuracy"], std=m["test_accuracy_std"],
                    accuracies=m["test_accuracies"], num_test=m["num_test"],
                    train_seconds_per_seed=m["train_seconds"] / args.transfer_seeds,
                    wall_seconds=time.perf_counter() - start,
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    measured_on=f"{platform.machine()}, {os.cpu_count()} CPUs")
    print(f"transfer ({transfer['model']}, {transfer['steps']} steps, {transfer['seeds']} seeds): "
          f"{100 * transfer['mean']:.2f} +- {100 * transfer['std']:.2f}% ({transfer['wall_seconds']:.0f} s)",
          flush=True)
    return transfer


def _zoo_dir(args, zoo) -> pathlib.Path:
    return pathlib.Path(args.index).parent if args.index else zoo.ZOO_DIR  # --index: the tests' own zoo


def _shipped_entry(args, zoo, parser):
    """``(index_file, entries, entry, file)`` of zoo set ``args.name``, its file checked against its sha256."""
    zoo_dir = _zoo_dir(args, zoo)
    index_file = zoo_dir / "index.json"
    entries = zoo.read_index(index_file)
    names = [e["name"] for e in entries]
    if args.name not in names:
        parser.error(f"no zoo set {args.name!r} in {index_file} (have: {', '.join(names)})")
    entry = entries[names.index(args.name)]
    target = zoo_dir / entry["file"]
    if zoo.file_sha256(target) != entry["sha256"]:
        parser.error(f"{target} does not match the sha256 in {index_file}: re-add the set instead")
    return index_file, entries, entry, target


def _update_transfer(args, zoo, parser) -> int:
    """``--transfer-only``: measure the shipped file of zoo set ``args.name`` and rewrite its transfer field."""
    index_file, _, _, target = _shipped_entry(args, zoo, parser)
    transfer = _transfer(target, args)
    # Re-read: another --transfer-only may have finished while this one trained.
    entries = zoo.read_index(index_file)
    entries[[e["name"] for e in entries].index(args.name)]["transfer"] = transfer
    _write_index(index_file, entries, regenerate_readme=args.index is None)
    print(f"transfer of {args.name} written to {index_file}")
    return 0


def _rename(args, zoo, parser) -> int:
    """``--rename-to``: move set ``args.name``'s file and entry to the new name; keep the old one as an alias."""
    zoo_dir = _zoo_dir(args, zoo)
    index_file = zoo_dir / "index.json"
    entries = zoo.read_index(index_file)
    names = [e["name"] for e in entries]
    taken = set(names) | {a for e in entries for a in e.get("aliases", [])}
    if args.name not in names:
        parser.error(f"no zoo set {args.name!r} in {index_file} (have: {', '.join(names)})")
    if args.rename_to in taken:
        parser.error(f"{args.rename_to!r} already names a zoo set (or was one's name)")
    entry = entries[names.index(args.name)]
    source, target = zoo_dir / entry["file"], zoo_dir / "sets" / f"{args.rename_to}.npz"
    if zoo.file_sha256(source) != entry["sha256"]:
        parser.error(f"{source} does not match the sha256 in {index_file}")
    source.rename(target)
    entry.update(name=args.rename_to, file=f"sets/{args.rename_to}.npz",
                 aliases=[*entry.get("aliases", []), args.name])
    _write_index(index_file, entries, regenerate_readme=args.index is None)
    print(f"{args.name} -> {args.rename_to} ({target}); {args.name} stays an alias")
    return 0


def _convert_zca(args, zoo, parser) -> int:
    """``--convert-zca``: store the ZCA of zoo set ``args.name`` as its recipe; re-measure KRR; keep the rest."""
    from kernel_distill.workflows.zoo import evaluate_file

    index_file, entries, entry, target = _shipped_entry(args, zoo, parser)
    val_size = args.zca_val_size if args.zca_val_size is not None else (entry.get("selection") or {}).get("val_size")
    before = target.stat().st_size
    checked = _store_zca_as_recipe(target, None, args.data_dir, val_size)
    if not checked:
        parser.error(f"{args.name} has no ZCA matrix to convert")
    from kernel_distill.io import load_distilled

    krr = evaluate_file(target, args.data_dir)
    subset_size = zoo_test_subset(entry["kernel"], entry["support_size"])
    subset = evaluate_file(target, args.data_dir, test_limit=subset_size) if subset_size else None
    old = entry["krr"]
    on_subset = "" if subset is None else f"; on {subset['num_test']} test images {100 * subset['test_accuracy']:.2f}%"
    print(f"KRR test accuracy: {100 * krr['test_accuracy']:.2f}% (was {100 * old['test_accuracy']:.2f}% with the "
          f"stored matrix){on_subset}", flush=True)
    entry.update(sha256=zoo.file_sha256(target), bytes=target.stat().st_size,
                 preprocessing=_preprocessing_text(load_distilled(target, args.data_dir)))
    entry["krr"] = dict(old, test_accuracy=krr["test_accuracy"], num_test=krr["num_test"],
                        seconds=round(krr["seconds"], 2),
                        **({"subset": dict(test_accuracy=subset["test_accuracy"], num_test=subset["num_test"])}
                           if subset else {}))
    entry["zca_conversion"] = dict(
        what=checked, bytes_before=before, krr_before=old["test_accuracy"],
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=shlex.join(["python", "tools/zoo_add.py", *(sys.argv[1:])]),
        transfer="the transfer numbers were measured with the float16 matrix the file held before")
    _write_index(index_file, entries, regenerate_readme=args.index is None)
    print(f"{args.name}: {before:,} -> {target.stat().st_size:,} bytes; entry updated in {index_file}")
    return 0


def _remeasure_subset(args, zoo, parser) -> int:
    """``--remeasure-subset``: the KRR accuracy of the shipped set ``args.name`` on the first
    :func:`zoo_test_subset` test images (what tests/test_zoo.py re-derives), written over ``krr.subset``."""
    from kernel_distill.workflows.zoo import evaluate_file

    index_file, _, entry, target = _shipped_entry(args, zoo, parser)
    size = zoo_test_subset(entry["kernel"], entry["support_size"])
    if size is None:
        parser.error(f"{args.name} is re-derived on the whole test set: it has no test subset")
    subset = evaluate_file(target, args.data_dir, test_limit=size)
    old = entry["krr"].get("subset")
    was = "" if old is None else f" (was {100 * old['test_accuracy']:.2f}% on {old['num_test']})"
    print(f"{args.name}: KRR {100 * subset['test_accuracy']:.2f}% on the first {subset['num_test']} test images"
          f"{was}", flush=True)
    entries = zoo.read_index(index_file)  # re-read: another in-place update may have finished meanwhile
    entries[[e["name"] for e in entries].index(args.name)]["krr"]["subset"] = dict(
        test_accuracy=subset["test_accuracy"], num_test=subset["num_test"],
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=shlex.join(["python", "tools/zoo_add.py", *(sys.argv[1:])]))
    _write_index(index_file, entries, regenerate_readme=args.index is None)
    return 0


def _write_index(index_file: pathlib.Path, entries: list, regenerate_readme: bool) -> None:
    from kernel_distill.atomic import atomic_write_text

    import zoo_table

    atomic_write_text(index_file, json.dumps(dict(format=1, sets=entries), indent=1) + "\n")
    if regenerate_readme:
        zoo_table.write()
        print("README zoo table regenerated")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="a run folder (with results.json) or a distilled-set .npz")
    parser.add_argument("--name", required=True, help="zoo name, e.g. mnist-kip-fc-10ipc (lowercase, digits, -)")
    parser.add_argument("--command", default=None, help="the exact command that made the set (default: the run's)")
    parser.add_argument("--wall-seconds", type=float, default=None, help="what making it took (default: the run's)")
    parser.add_argument("--machine", default=None, help="where it was made (default: the run's provenance)")
    parser.add_argument("--note", default=None, help="a remark shown by `zoo show` (e.g. what was tried)")
    parser.add_argument("--published", type=float, default=None, help="published accuracy in %% to show beside")
    parser.add_argument("--published-what", default=None, help="what the published number is, and its source")
    parser.add_argument("--no-transfer", action="store_true", help="skip the transfer measurement")
    parser.add_argument("--transfer-only", action="store_true",
                        help="measure transfer for the zoo set --name as shipped and update only its transfer field")
    parser.add_argument("--zca-val-size", type=int, default=None,
                        help="validation images the set's ZCA left out, where the set does not record it (a ZCA is "
                             "always stored as its recipe, checked against the file's matrix)")
    parser.add_argument("--rename-to", default=None, metavar="NEW",
                        help="rename the zoo set --name (no source) to NEW: its file and entry move, the old name "
                             "stays an alias (zoo:OLD keeps giving the same set)")
    parser.add_argument("--convert-zca", action="store_true",
                        help="rewrite the zoo set --name (no source) with its ZCA matrix as a recipe, re-measure its "
                             "KRR accuracy and update only those fields of its entry")
    parser.add_argument("--remeasure-subset", action="store_true",
                        help="re-measure the KRR accuracy of the zoo set --name (no source) on the test subset that "
                             "tests/test_zoo.py re-derives (its size: ZOO_TEST_SUBSET, ZOO_TEST_EXACT_CONV_PAIRS) "
                             "and update only that field")
    parser.add_argument("--compress", action="store_true",
                        help="store a set already in the zoo as a compressed .npz (the same arrays; new sets are "
                             "always stored compressed)")
    parser.add_argument("--float16-images", action="store_true",
                        help="store the images as float16 (half the bytes; the zoo's budget is 15 MB) and measure "
                             "every number on them")
    parser.add_argument("--krr-test-limit", type=int, default=None, metavar="N",
                        help="measure the KRR accuracy on the first N test images (limit_test) instead of all of them: "
                             "for an exact ConvNet-kernel set too large for a whole-test pass here (500 images: over an "
                             "hour on 2 cores); the entry says so, with the run's own whole-test number beside it")
    parser.add_argument("--transfer-model", default="evalnet")
    parser.add_argument("--transfer-steps", type=int, default=300)
    parser.add_argument("--transfer-batch", type=int, default=128)
    parser.add_argument("--transfer-seeds", type=int, default=3)
    parser.add_argument("--data-dir", default=None, help="datasets (default $KERNEL_DISTILL_DATA)")
    parser.add_argument("--index", default=None, help=argparse.SUPPRESS)  # tests: another index and folder
    args = parser.parse_args(argv)

    import re

    from kernel_distill import zoo
    from kernel_distill.io import load_distilled
    from kernel_distill.workflows.zoo import evaluate_file

    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", args.name):
        parser.error(f"--name {args.name!r}: use lowercase letters, digits, '-', '_' and '.'")
    if args.rename_to is not None:
        if args.source is not None or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", args.rename_to):
            parser.error("--rename-to NEW takes no source; NEW: lowercase letters, digits, '-', '_' and '.'")
        return _rename(args, zoo, parser)
    if args.convert_zca:
        if args.source is not None:
            parser.error("--convert-zca takes no source: it rewrites a set already in the zoo")
        return _convert_zca(args, zoo, parser)
    if args.compress:
        if args.source is not None:
            parser.error("--compress takes no source: it rewrites a set already in the zoo")
        return _compress(args, zoo, parser)
    if args.remeasure_subset:
        if args.source is not None:
            parser.error("--remeasure-subset takes no source: it measures a set already in the zoo")
        return _remeasure_subset(args, zoo, parser)
    if args.transfer_only:
        if args.source is not None or args.no_transfer:
            parser.error("--transfer-only takes no source and no --no-transfer: it measures a set already in the zoo")
        return _update_transfer(args, zoo, parser)
    if args.source is None:
        parser.error("give a run folder or an .npz (or --transfer-only for a set already in the zoo)")
    npz, record = _source(pathlib.Path(args.source))
    if record is None and not args.command:
        parser.error("an .npz source needs --command (the exact command that made it)")
    distilled = load_distilled(npz)
    meta = distilled.metadata
    prov = record["provenance"] if record else {}
    zoo_dir = _zoo_dir(args, zoo)
    index_file = zoo_dir / "index.json"

    target = zoo_dir / "sets" / f"{args.name}.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(npz.read_bytes())
    zca_note = _store_zca_as_recipe(target, record, args.data_dir, args.zca_val_size)
    if args.float16_images:
        zca_note = "; ".join(n for n in (zca_note, _store_float16_images(target, args.data_dir)) if n)
    _store_compressed(target)
    distilled = load_distilled(target, args.data_dir)
    print(f"{npz} -> {target} ({target.stat().st_size:,} bytes)", flush=True)

    from kernel_distill.io import dataset_of
    from kernel_distill.kernels import KernelSpec
    from kernel_distill.krr import DEFAULT_REG

    kernel = KernelSpec.from_dict(meta["kernel"]).to_dict() if "kernel" in meta else None
    # float16 images are not the run's images: their accuracy is measured, never taken from the run
    run_krr = _krr_from_run(record, kernel, meta.get("get", "ntk")) if kernel else None
    from_run = run_krr if not args.float16_images and args.krr_test_limit is None else None
    if from_run is not None:
        krr = dict(from_run, dataset=dataset_of(distilled, str(npz), None), kernel=kernel,
                   get=meta.get("get", "ntk"), reg=meta.get("reg", DEFAULT_REG))
    else:
        krr = evaluate_file(target, args.data_dir, test_limit=args.krr_test_limit)
    how = krr.get("measured_by") or f"{krr['seconds']:.1f} s"
    print(f"KRR test accuracy ({krr['kernel']['architecture']} {krr['get']}, reg {krr['reg']:g}): "
          f"{100 * krr['test_accuracy']:.2f}% on {krr['num_test']} {krr['dataset']} test images ({how})", flush=True)
    # Random-feature and exact ConvNet kernels are slow per test image: the zoo's test re-derives them on the
    # test images limit_test keeps, so the index records that number too.
    subset_size = zoo_test_subset(krr["kernel"], len(distilled.images))
    # the same measurement when --krr-test-limit is the subset's size: not made twice
    subset = None if not subset_size else krr if subset_size == args.krr_test_limit else \
        evaluate_file(target, args.data_dir, test_limit=subset_size)
    transfer = None
    if not args.no_transfer:
        transfer = _transfer(target, args)

    size = len(distilled.images)
    method = meta.get("method", "file")
    per_class = meta.get("per_class") or size // distilled.num_classes
    published = (dict(accuracy=round(args.published / 100, 6), what=args.published_what or "")
                 if args.published is not None else _published(method, krr["kernel"]["architecture"], krr["dataset"],
                                                                size))
    selection = dict(record["selection"]) if record else dict(split="none")
    entry = dict(
        name=args.name, file=f"sets/{args.name}.npz", sha256=zoo.file_sha256(target), bytes=target.stat().st_size,
        dataset=krr["dataset"], lossy=krr["dataset"] == "cifar10", method=method,
        labels="solved" if method == "label_solve" else ("learned" if meta.get("learn_labels") else "one-hot"),
        per_class=per_class, support_size=size, kernel=krr["kernel"], get=krr["get"], reg=krr["reg"],
        preprocessing=_preprocessing_text(distilled), selection=selection,
        krr=dict(test_accuracy=krr["test_accuracy"], num_test=krr["num_test"], dtype="float32",
                 seconds=round(krr["seconds"], 2),
                 **({"measured_by": krr["measured_by"]} if "measured_by" in krr else {}),
                 **({"test_limit": args.krr_test_limit} if args.krr_test_limit is not None else {}),
                 # the run's whole-test number of its own (float32) images, for scale, when this one is not it
                 **({"run_whole_test": dict(test_accuracy=run_krr["test_accuracy"], num_test=run_krr["num_test"],
                                            images="float32", measured_by=run_krr["measured_by"])}
                    if run_krr is not None and from_run is None else {}),
                 **({"subset": dict(test_accuracy=subset["test_accuracy"], num_test=subset["num_test"])}
                    if subset else {})),
        transfer=transfer, published=published,
        command=args.command or prov.get("command_line"),
        wall_seconds=args.wall_seconds if args.wall_seconds is not None else prov.get("wall_seconds"),
        machine=args.machine or (f"{prov.get('machine')}, {prov.get('device')} ({prov.get('backend')}), shared with "
                                 f"other jobs" if prov else None),
        date=prov.get("date") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        git_commit=prov.get("git_commit"), note=" ".join(n for n in (args.note, zca_note and zca_note + ".") if n) or None,
        added_with=shlex.join(["python", "tools/zoo_add.py", *(sys.argv[1:] if argv is None else argv)]),
        measured_on=f"{platform.machine()}, {os.cpu_count()} CPUs",
    )
    entries = zoo.read_index(index_file)
    names = [e["name"] for e in entries]
    if args.name in names:  # a replaced set keeps its place in the index and the README table
        entries[names.index(args.name)] = entry
    else:
        entries.append(entry)
    _write_index(index_file, entries, regenerate_readme=args.index is None)
    print(f"index entry {args.name} written to {index_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
