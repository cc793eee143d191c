"""The distilled-set zoo: every packaged set re-measured on the real test set, checksums, zoo:NAME in the
commands, the adding tool, downloads of a set by URL, the README table and the wheel's package data."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import pathlib
import subprocess
import sys
import tomllib
import zipfile

import numpy as np
import pytest

from kernel_distill import zoo
from kernel_distill.cli import main
from kernel_distill.data import limit_test, load_dataset
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import load_distilled
from kernel_distill.kernels import KernelSpec
from kernel_distill.results import read_results
from kernel_distill.workflows.zoo import evaluate_file

REPO = pathlib.Path(__file__).resolve().parents[1]
ENTRIES = zoo.read_index()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------
# The packaged sets.


def test_the_zoo_covers_mnist_and_fashion_mnist_with_kip_and_label_solve():
    assert len({e["name"] for e in ENTRIES}) == len(ENTRIES)
    assert {e["dataset"] for e in ENTRIES} <= {"mnist", "fashion_mnist", "cifar10"}
    for dataset in ("mnist", "fashion_mnist"):
        assert {e["method"] for e in ENTRIES if e["dataset"] == dataset} == {"kip", "label_solve"}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_packaged_set_matches_its_index_entry(entry, request):
    if "recipe" in entry["preprocessing"]:  # its ZCA matrix is refitted from the real training split
        request.getfixturevalue("shared_data_dir")
    path = zoo.path(entry["name"])  # the sha256 is checked here
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert path.stat().st_size == entry["bytes"]
    distilled = load_distilled(path)
    meta = distilled.metadata
    assert meta["dataset"] == entry["dataset"]
    # Compared as specs: a file written before a field was added to KernelSpec reads with its default.
    assert KernelSpec.from_dict(meta["kernel"]) == KernelSpec.from_dict(entry["kernel"])
    assert meta.get("get", "ntk") == entry["get"] and meta.get("reg") == entry["reg"]
    assert len(distilled.images) == entry["support_size"] and distilled.images.dtype == np.float32
    assert entry["selection"]["split"] in ("validation", "none")  # never selected on the test set
    assert entry["command"] and entry["wall_seconds"] > 0 and entry["machine"]
    if entry["transfer"] is not None:
        t = entry["transfer"]
        assert len(t["accuracies"]) == t["seeds"] == 3
        assert t["mean"] == pytest.approx(np.mean(t["accuracies"]))


def _read_set(file):
    """A distilled-set file read with numpy alone: images, labels, preprocessing arrays and metadata. A ZCA
    stored as its recipe (no ``zca_matrix`` in the file) is refitted by ``zca_recipes``, whose refit
    tests/test_zca_recipes.py checks against the matrix a run used; the KRR path below stays independent."""
    with np.load(file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("metadata")))
    if "zca_recipe" in meta and "zca_matrix" not in arrays:
        from kernel_distill.preprocess import ZcaRecipe
        from kernel_distill.zca_recipes import zca_matrix

        arrays["zca_matrix"] = zca_matrix(ZcaRecipe.from_dict(meta["zca_recipe"]), arrays["preprocess_mean"],
                                          arrays["preprocess_std"], progress=False)
    return arrays, meta


def _preprocess(x, arrays, meta):
    """The file's preprocessing, written out here: ``(x / 255 - mean) / std``, then (when the file has a ZCA
    matrix) per-image layer normalisation (mean 0, norm sqrt(d)) and the matrix. float64, cast to float32."""
    z = (x.astype(np.float64) / 255.0 - arrays["preprocess_mean"].astype(np.float64)) / arrays["preprocess_std"]
    if "zca_matrix" in arrays:
        flat = z.reshape(len(z), -1)
        if meta.get("zca_layer_norm", True):
            flat = flat - flat.mean(axis=1, keepdims=True)
            flat = flat / np.linalg.norm(flat, axis=1, keepdims=True) * np.sqrt(flat.shape[1])
        z = (flat @ arrays["zca_matrix"].astype(np.float64)).reshape(z.shape)
    return z.astype(np.float32)


EXACT_CONV_TILE = 100


def _tiled_kernel(kernel_fn, a, b, get, tile, symmetric=False):
    """``(len(a), len(b))`` float64 kernel matrix from ``(tile, tile)`` calls (a short edge padded with copies of
    its last image, so one input shape); with ``symmetric`` (``a`` is ``b``) only tiles on or above the
    diagonal are computed and the rest mirrored."""
    def padded(x, start):
        piece = x[start:start + tile]
        return np.concatenate([piece, np.repeat(piece[-1:], tile - len(piece), axis=0)]), len(piece)

    out = np.empty((len(a), len(b)))
    for i in range(0, len(a), tile):
        pa, na = padded(a, i)
        for j in range(i if symmetric else 0, len(b), tile):
            pb, nb = padded(b, j)
            out[i:i + na, j:j + nb] = np.asarray(kernel_fn(pa, pb, get=get), np.float64)[:na, :nb]
            if symmetric and j > i:
                out[j:j + nb, i:i + na] = out[i:i + na, j:j + nb].T
    return out


def test_tiled_kernel_matches_one_call(rng):
    from kernel_distill.kernels import make_kernel_fn

    kernel_fn = make_kernel_fn(KernelSpec(architecture="fc", depth=1))
    a, b = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    direct = np.asarray(kernel_fn(a, a, get="ntk"), np.float64)
    np.testing.assert_allclose(_tiled_kernel(kernel_fn, a, a, "ntk", 3, symmetric=True), direct, rtol=1e-6)
    np.testing.assert_allclose(_tiled_kernel(kernel_fn, a, b, "nngp", 3),
                               np.asarray(kernel_fn(a, b, get="nngp")), rtol=1e-6)


def _independent_krr_accuracy(file, x_test, y_test, block=1000):
    """KRR test accuracy of a zoo file by a path that does not go through ``workflows.zoo.evaluate_file``,
    ``experiments`` or ``krr``: the file and test split read with numpy, the preprocessing above, the
    package's kernel function (rebuilt from the file's metadata) for the kernel matrices only, and the
    ridge ``reg * trace(K_ss) / n`` solve in float64 with scipy."""
    import scipy.linalg

    from kernel_distill.kernels import make_kernel_fn

    arrays, meta = _read_set(file)
    spec = KernelSpec.from_dict(meta["kernel"])
    kernel_fn = make_kernel_fn(spec)
    get, reg = meta.get("get", "ntk"), meta.get("reg", 1e-6)
    xs, ys = arrays["images"].astype(np.float32), arrays["labels"].astype(np.float64)
    if spec.is_conv and spec.random_features is None:
        # O(pixels^2) per pair: every matrix in tiles of one shape (one compilation for all exact-kernel sets)
        # and K_ss from its upper triangle, which is most of a 500-image set's pairs.
        def kernel(a, b):
            return _tiled_kernel(kernel_fn, a, b, get, EXACT_CONV_TILE, symmetric=a is b)
    else:
        def kernel(a, b):
            return np.asarray(kernel_fn(a, b, get=get), np.float64)
    k_ss = kernel(xs, xs)
    k_ss = k_ss + reg * np.trace(k_ss) / len(k_ss) * np.eye(len(k_ss))
    alpha = scipy.linalg.solve(k_ss, ys, assume_a="pos")
    correct = 0
    for start in range(0, len(x_test), block):
        zb = _preprocess(x_test[start:start + block], arrays, meta)
        pred = kernel(zb, xs) @ alpha
        correct += int(np.sum(pred.argmax(axis=1) == y_test[start:start + block]))
    return correct / len(x_test)


def _real_test_split(data_dir, dataset):
    """``<data>/<dataset>/test.npz`` (CIFAR-10: its lossy copy ``cifar10_jpeg_lossy`` when that is what the
    folder holds), read with numpy."""
    folder = data_dir / dataset
    if not (folder / "test.npz").is_file() and dataset == "cifar10":
        folder = data_dir / "cifar10_jpeg_lossy"
    with np.load(folder / "test.npz") as z:
        return z["x"], z["y"].astype(np.int64)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_packaged_set_reproduces_its_krr_accuracy_on_the_real_test_set(entry, shared_data_dir):
    """The index's KRR number (written by tools/zoo_add.py through ``workflows.zoo.evaluate_file``) re-derived
    independently on the whole real test set, to 0.1 point (10 images: float32 kernels, float64 solves).
    A random-feature set is re-derived on the 1,000 test images ``limit_test`` keeps, an exact ConvNet-kernel
    set on the few hundred its cost allows (its ``krr.subset``, measured the same way, to one image): a forward
    pass of every network, or O(pixels^2) per pair, is most of this suite's time."""
    x_test, y_test = _real_test_split(shared_data_dir, entry["dataset"])
    assert len(y_test) == 10000 and entry["krr"]["num_test"] == entry["krr"].get("test_limit", 10000)
    expected = entry["krr"]
    assert ("subset" in expected) == (entry["kernel"].get("random_features") is not None
                                      or entry["kernel"]["architecture"] != "fc")
    if "subset" in expected:
        expected = entry["krr"]["subset"]
        x_test, y_test = limit_test(x_test, y_test, expected["num_test"])
        assert len(y_test) == expected["num_test"] >= 100
    measured = _independent_krr_accuracy(zoo.path(entry["name"]), x_test, y_test)
    tolerance = max(0.1, 100 / len(y_test))
    assert abs(100 * measured - 100 * expected["test_accuracy"]) <= tolerance + 1e-9, (entry["name"], measured)


def test_package_data_ships_every_zoo_file():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["kernel_distill.zoo"]
    shipped = ["index.json", *(e["file"] for e in ENTRIES)]
    for name in shipped:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    total = sum(e["bytes"] for e in ENTRIES)
    assert total < 15 * 2**20  # the issue-26 budget: ZCA matrices are stored as recipes


def test_readme_zoo_table_is_generated_from_the_index():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "zoo_table.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    readme = (REPO / "README.md").read_text()
    for e in ENTRIES:
        assert f"`{e['name']}`" in readme


# ----------------------------------------------------------------------------------------------------
# A zoo of our own, on digits (no real data needed): the tool, zoo:NAME, checksums, export, downloads.


def assert_same_arrays(a: pathlib.Path, b: pathlib.Path) -> None:
    with np.load(a) as fa, np.load(b) as fb:
        assert sorted(fa.files) == sorted(fb.files)
        for name in fa.files:
            assert fa[name].dtype == fb[name].dtype and np.array_equal(fa[name], fb[name]), name


@pytest.fixture
def digits_zoo(tmp_path, monkeypatch, capsys):
    """A zoo in tmp_path/zoo holding one digits set added by tools/zoo_add.py (a tiny transfer included)."""
    assert run(capsys, "baseline", "--dataset", "digits", "--per-class", "3", "--seeds", "1", "--no-progress",
               "--out", str(tmp_path / "run"))[0] == 0
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import zoo_add
    finally:
        sys.path.remove(str(REPO / "tools"))
    index = tmp_path / "zoo" / "index.json"
    assert zoo_add.main([str(tmp_path / "run" / "natural.npz"), "--name", "digits-natural-3", "--command",
                         "kernel-distill baseline --dataset digits --per-class 3 --seeds 1", "--wall-seconds", "1.5",
                         "--machine", "test", "--transfer-model", "fc", "--transfer-steps", "3",
                         "--transfer-seeds", "2", "--index", str(index)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(zoo, "ZOO_DIR", index.parent)
    monkeypatch.setattr(zoo, "INDEX_FILE", index)
    return index


def test_zoo_add_measures_and_records(digits_zoo, tmp_path):
    (entry,) = zoo.read_index()
    assert entry["name"] == "digits-natural-3" and entry["support_size"] == 30 and entry["per_class"] == 3
    assert entry["command"].startswith("kernel-distill baseline") and entry["wall_seconds"] == 1.5
    file = digits_zoo.parent / entry["file"]
    assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert_same_arrays(file, tmp_path / "run" / "natural.npz")
    assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in zipfile.ZipFile(file).infolist())
    # The KRR number is the file's own kernel on the whole digits test split, as `evaluate` computes it, and
    # the same number re-derived without evaluate_file (to one of the 359 test images: float32 kernels).
    measured = evaluate_file(file)
    assert measured["test_accuracy"] == entry["krr"]["test_accuracy"] and measured["num_test"] == 359
    x_test, y_test = load_dataset("digits", "test")
    independent = _independent_krr_accuracy(file, x_test, y_test)
    assert abs(independent - entry["krr"]["test_accuracy"]) <= 1 / 359 + 1e-12, (independent, entry["krr"])
    # Transfer: what `kernel-distill transfer` gives for the same protocol, seed by seed; whole test images.
    t = entry["transfer"]
    assert t["model"] == "fc" and t["steps"] == 3 and t["num_test"] == 359
    assert len(t["accuracies"]) == t["seeds"] == 2
    assert all(abs(a * 359 - round(a * 359)) < 1e-9 for a in t["accuracies"])
    assert t["mean"] == pytest.approx(np.mean(t["accuracies"]))
    assert t["std"] == pytest.approx(np.std(t["accuracies"], ddof=1))
    assert main(["transfer", str(file), "--model", "fc", "--steps", "3", "--seeds", "2", "--eval-every", "3",
                 "--batch-size", str(t["batch_size"]), "--lr", str(t["learning_rate"]), "--loss", "mse",
                 "--no-progress", "--out", str(tmp_path / "transfer")]) == 0
    assert read_results(tmp_path / "transfer")["metrics"]["test_accuracies"] == t["accuracies"]


def test_zoo_add_transfer_only_replaces_just_the_transfer_field(digits_zoo, capsys):
    import zoo_add

    (before,) = zoo.read_index()
    assert zoo_add.main(["--transfer-only", "--name", "digits-natural-3", "--transfer-model", "fc",
                         "--transfer-steps", "2", "--transfer-seeds", "1", "--index", str(digits_zoo)]) == 0
    (after,) = zoo.read_index()
    assert after["transfer"]["steps"] == 2 and len(after["transfer"]["accuracies"]) == 1
    assert after["transfer"]["date"].endswith("Z")
    assert {k: v for k, v in after.items() if k != "transfer"} == {k: v for k, v in before.items() if k != "transfer"}
    for argv, says in ((["--transfer-only", "--name", "no-such-set"], "no zoo set 'no-such-set'"),
                       (["x.npz", "--transfer-only", "--name", "digits-natural-3"], "takes no source")):
        with pytest.raises(SystemExit) as exit_:
            zoo_add.main([*argv, "--index", str(digits_zoo)])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    (digits_zoo.parent / after["file"]).write_bytes(b"changed")
    with pytest.raises(SystemExit):
        zoo_add.main(["--transfer-only", "--name", "digits-natural-3", "--index", str(digits_zoo)])
    assert "does not match the sha256" in capsys.readouterr().err


def test_zoo_add_compress_stores_a_shipped_set_compressed_with_the_same_arrays(digits_zoo, capsys):
    """``--compress`` (the sets added before the zoo stored files compressed): the file becomes a deflated
    ``.npz`` of the same arrays, and only the entry's sha256 and bytes change."""
    import zoo_add

    (entry,) = zoo.read_index()
    file = digits_zoo.parent / entry["file"]
    with np.load(file) as f:
        arrays = {name: f[name] for name in f.files}
    np.savez(file, **arrays)  # as the zoo stored sets before
    entry.update(sha256=hashlib.sha256(file.read_bytes()).hexdigest(), bytes=file.stat().st_size)
    digits_zoo.write_text(json.dumps(dict(format=1, sets=[entry])))
    uncompressed = file.read_bytes()
    assert zoo_add.main(["--compress", "--name", "digits-natural-3", "--index", str(digits_zoo)]) == 0
    (after,) = zoo.read_index()
    assert after["bytes"] == file.stat().st_size < len(uncompressed)
    assert after["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest() != entry["sha256"]
    assert {k: v for k, v in after.items() if k not in ("sha256", "bytes")} == \
        {k: v for k, v in entry.items() if k not in ("sha256", "bytes")}
    with np.load(file) as f:
        assert sorted(f.files) == sorted(arrays)
        assert all(f[n].dtype == arrays[n].dtype and np.array_equal(f[n], arrays[n]) for n in arrays)
    assert zoo.path("digits-natural-3") == file  # the new sha256 is the one checked on use
    with pytest.raises(SystemExit) as exit_:
        zoo_add.main(["--compress", "--name", "digits-natural-3", "extra.npz", "--index", str(digits_zoo)])
    assert exit_.value.code == 2 and "takes no source" in capsys.readouterr().err


def test_zoo_add_remeasure_subset_rewrites_just_the_subset_the_suite_re_derives(digits_zoo, capsys, monkeypatch):
    """``--remeasure-subset``: the set's KRR accuracy on the first ``zoo_test_subset`` test images, as
    ``evaluate_file`` measures it with that limit, replaces ``krr.subset`` and nothing else; a set re-derived
    on the whole test set (an FC kernel) has no subset and is refused."""
    import zoo_add

    with pytest.raises(SystemExit) as exit_:
        zoo_add.main(["--remeasure-subset", "--name", "digits-natural-3", "--index", str(digits_zoo)])
    assert exit_.value.code == 2 and "no test subset" in capsys.readouterr().err
    monkeypatch.setattr(zoo_add, "zoo_test_subset", lambda kernel, support_size: 100)
    (before,) = zoo.read_index()
    assert zoo_add.main(["--remeasure-subset", "--name", "digits-natural-3", "--index", str(digits_zoo)]) == 0
    (after,) = zoo.read_index()
    subset = after["krr"].pop("subset")
    expected = evaluate_file(digits_zoo.parent / after["file"], test_limit=100)
    assert subset["num_test"] == 100 and subset["test_accuracy"] == expected["test_accuracy"]
    assert after == before and subset["date"].endswith("Z")


def test_zoo_commands(digits_zoo, tmp_path, capsys):
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0 and "digits-natural-3" in out
    code, out, _ = run(capsys, "zoo", "show", "digits-natural-3", "--json")
    assert code == 0 and json.loads(out)["sha256"] == zoo.entry("digits-natural-3")["sha256"]
    code, out, _ = run(capsys, "zoo", "export", "digits-natural-3", str(tmp_path))
    assert code == 0
    assert (tmp_path / "digits-natural-3.npz").read_bytes() == zoo.path("digits-natural-3").read_bytes()
    code, _, err = run(capsys, "zoo", "show", "no-such-set")
    assert code == 2 and err.count("\n") == 1 and "digits-natural-3" in err


def test_zoo_names_work_where_a_file_does(digits_zoo, tmp_path, capsys):
    code, out, _ = run(capsys, "evaluate", "zoo:digits-natural-3", "--no-progress", "--json")
    assert code == 0
    record = json.loads(out.strip().splitlines()[-1])
    assert record["metrics"]["test_accuracy"] == zoo.entry("digits-natural-3")["krr"]["test_accuracy"]
    code, out, _ = run(capsys, "label-solve", "--dataset", "digits", "--support", "zoo:digits-natural-3",
                       "--no-progress", "--out", str(tmp_path / "ls"))
    assert code == 0 and (tmp_path / "ls" / "distilled.npz").is_file()
    code, out, _ = run(capsys, "transfer", "zoo:digits-natural-3", "--model", "fc", "--steps", "2", "--seeds", "1",
                       "--eval-every", "2", "--no-progress")
    assert code == 0 and "test accuracy" in out
    code, _, err = run(capsys, "evaluate", "zoo:missing", "--no-progress")
    assert code == 2 and "no zoo set named 'missing'" in err


def test_a_changed_zoo_file_is_refused(digits_zoo, capsys):
    file = digits_zoo.parent / zoo.entry("digits-natural-3")["file"]
    distilled = load_distilled(file)
    from kernel_distill.io import DistilledSet, save_distilled

    save_distilled(file, DistilledSet(distilled.images * 1.01, distilled.labels, distilled.preprocessor,
                                      distilled.metadata))  # still a valid file: only the checksum can tell
    with pytest.raises(KernelDistillError, match="sha256"):
        zoo.load("digits-natural-3")
    code, _, err = run(capsys, "evaluate", "zoo:digits-natural-3", "--no-progress")
    assert code == 2 and "corrupt or was changed" in err


def test_a_zoo_set_given_by_url_is_downloaded_once_and_verified(digits_zoo, tmp_path, monkeypatch, capsys):
    from test_data import serve

    entries = zoo.read_index()
    file = digits_zoo.parent / entries[0]["file"]
    blob = file.read_bytes()
    file.unlink()  # not packaged: only a URL
    with serve({"digits-natural-3.npz": blob}) as url:
        entries[0]["url"] = url + "digits-natural-3.npz"
        digits_zoo.write_text(json.dumps(dict(format=1, sets=entries)))
        path = zoo.path("digits-natural-3", data_dir=tmp_path / "data", progress=False)
    assert path == tmp_path / "data" / "zoo" / "digits-natural-3.npz" and path.read_bytes() == blob
    assert zoo.path("digits-natural-3", data_dir=tmp_path / "data").read_bytes() == blob  # served no more
    with serve({"digits-natural-3.npz": blob[:-10] + b"0123456789"}) as url:
        path.unlink()
        entries[0]["url"] = url + "digits-natural-3.npz"
        digits_zoo.write_text(json.dumps(dict(format=1, sets=entries)))
        with pytest.raises(KernelDistillError, match="checksum mismatch"):
            zoo.path("digits-natural-3", data_dir=tmp_path / "data", progress=False)
    assert not path.exists()


def test_zoo_grids_in_the_html_report(digits_zoo, tmp_path, capsys):
    code, out, _ = run(capsys, "zoo", "report", "--out", str(tmp_path / "zoo-report"))
    assert code == 0
    page = (tmp_path / "zoo-report" / "index.html").read_text()
    assert "digits-natural-3" in page and 'src="img/zoo-digits-natural-3.png"' in page
    assert (tmp_path / "zoo-report" / "img" / "zoo-digits-natural-3.png").stat().st_size > 1000
    # In the runs' report too, and an evaluate run of zoo:NAME shows the set's grid.
    assert run(capsys, "evaluate", "zoo:digits-natural-3", "--no-progress", "--out", str(tmp_path / "ev"))[0] == 0
    code, _, _ = run(capsys, "report", str(tmp_path / "ev"), "--out", str(tmp_path / "report"), "--zoo")
    assert code == 0
    assert "zoo-digits-natural-3.png" in (tmp_path / "report" / "index.html").read_text()
    assert "-grid.png" in next((tmp_path / "report" / "runs").glob("*.html")).read_text()


def test_every_name_says_images_per_class_and_former_names_still_open_the_set():
    for e in ENTRIES:
        assert e["name"].endswith(f"-{e['per_class']}ipc"), e["name"]
        assert e["support_size"] == e["per_class"] * 10
    # Label Solve sets were named by their total size before: the alias opens the same 10-per-class set.
    assert zoo.entry("mnist-ls-fc-100")["name"] == "mnist-ls-fc-10ipc"
    assert zoo.resolve("zoo:mnist-ls-fc-100") == str(zoo.path("mnist-ls-fc-10ipc"))
    aliases = [a for e in ENTRIES for a in e.get("aliases", [])]
    assert len(aliases) == len(set(aliases)) and not set(aliases) & {e["name"] for e in ENTRIES}


def test_zoo_add_renames_a_set_and_keeps_its_old_name(digits_zoo, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import zoo_add
    finally:
        sys.path.remove(str(REPO / "tools"))
    before = zoo.entry("digits-natural-3")
    args = ["--name", "digits-natural-3", "--rename-to", "digits-natural-3ipc", "--index", str(digits_zoo)]
    assert zoo_add.main(args) == 0
    (entry,) = zoo.read_index()
    assert entry["name"] == "digits-natural-3ipc" and entry["aliases"] == ["digits-natural-3"]
    assert entry["sha256"] == before["sha256"] and zoo.path("digits-natural-3").name == "digits-natural-3ipc.npz"
    with pytest.raises(SystemExit):  # a taken name (here: the alias) is refused
        zoo_add.main(["--name", "digits-natural-3ipc", "--rename-to", "digits-natural-3", "--index", str(digits_zoo)])


def test_zoo_add_can_store_float16_images_and_measures_the_rounded_set(digits_zoo, tmp_path, capsys):
    import zoo_add

    source = tmp_path / "run" / "natural.npz"
    assert zoo_add.main([str(source), "--name", "digits-natural-3-half", "--command", "kernel-distill baseline",
                         "--float16-images", "--no-transfer", "--index", str(digits_zoo)]) == 0
    entry = zoo.entry("digits-natural-3-half")
    file = digits_zoo.parent / entry["file"]
    with np.load(file) as f, np.load(source) as original:
        assert f["images"].dtype == np.float16 and f["labels"].dtype == np.float32
        assert f["images"].nbytes * 2 == original["images"].nbytes
    assert entry["bytes"] < source.stat().st_size and "float16" in entry["note"]
    full, half = load_distilled(source), load_distilled(file)
    assert half.images.dtype == np.float32
    np.testing.assert_allclose(half.images, full.images, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(half.labels, full.labels)
    assert evaluate_file(file)["test_accuracy"] == entry["krr"]["test_accuracy"]


def test_zoo_add_krr_test_limit_measures_the_first_test_images_and_says_so(digits_zoo, tmp_path):
    import zoo_add

    source = tmp_path / "run" / "natural.npz"
    assert zoo_add.main([str(source), "--name", "digits-natural-3-limited", "--command", "kernel-distill baseline",
                         "--krr-test-limit", "200", "--no-transfer", "--index", str(digits_zoo)]) == 0
    entry = zoo.entry("digits-natural-3-limited")
    assert entry["krr"]["num_test"] == entry["krr"]["test_limit"] == 200
    assert evaluate_file(digits_zoo.parent / entry["file"], test_limit=200)["test_accuracy"] \
        == entry["krr"]["test_accuracy"]
    (row,) = zoo.table_rows([entry])
    assert row[4].endswith("(first 200 test images)")
