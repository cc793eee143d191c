"""A static HTML report of run folders: works offline, from a plain folder (no server, no CDN).

``build_report(run_dirs, out_dir)`` writes

* ``out_dir/index.html``: test accuracy against support size per method and dataset (a chart), and a
  sortable table of every run (click a column header; a small inline script, no libraries);
* ``out_dir/runs/<name>.html``: one page per run with its image grid (grouped by the original class, the
  learned label shown), the loss / validation / test curves, the Label-Solve heat map, the transfer
  curves, the metrics, how the reported support was selected, the config and the provenance;
* ``out_dir/img/*.png``: the pictures, drawn by the same :mod:`kernel_distill.plots` functions that make
  the commands' PNG files.

Every run folder needs a ``results.json`` (:mod:`kernel_distill.results`); pictures are drawn from what
the folder holds (``distilled.npz``, ``metrics.jsonl``) and skipped when it does not hold it.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterable

import numpy as np

from kernel_distill import plots
from kernel_distill.atomic import atomic_write_text
from kernel_distill.errors import KernelDistillError
from kernel_distill.results import RESULTS_FILE, read_results

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th.sortable { cursor: pointer; background: #f3f3f3; }
th.sortable:hover { background: #e3e3ff; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 85%; }
img { max-width: 100%; }
"""

# Sorts the table whose header was clicked by that column: numbers (data-value) numerically, the rest as
# text; a second click reverses. The direction is kept on the header for the test and for the eye.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th.sortable").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("data-order") !== "ascending";
      table.querySelectorAll("th.sortable").forEach(function (other) { other.removeAttribute("data-order"); });
      th.setAttribute("data-order", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].getAttribute("data-value"), y = b.cells[column].getAttribute("data-value");
        var nx = parseFloat(x), ny = parseFloat(y);
        var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n" + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


def find_runs(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """Run folders among ``paths``: each path holding ``results.json``, else its sub-folders that do."""
    found: list[pathlib.Path] = []
    for path in map(pathlib.Path, paths):
        if (path / RESULTS_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            children = sorted(p.parent for p in path.glob(f"*/{RESULTS_FILE}"))
            if not children:
                raise KernelDistillError(f"{path} holds no {RESULTS_FILE} (not a run folder, nor a folder of them)")
            found.extend(children)
        else:
            raise KernelDistillError(f"{path}: no such folder")
    if not found:
        raise KernelDistillError("no run folders given")
    return found


def _slug(path: pathlib.Path, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(path.resolve().parts[-2:])).strip("-") or "run"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _signed_points(value) -> str:
    """A DD-Ranking gain (a fraction) in percentage points, ``-`` when the run did not measure it."""
    return "-" if value is None else f"{100 * value:+.2f}"


def _label(record: dict) -> str:
    config = record["config"]
    if record["command"] == "kip":
        return f"KIP {config.get('kernel', {}).get('architecture', '')}" + (
            " (learned labels)" if config.get("learn_labels") else "")
    if record["command"] == "transfer":
        return f"transfer {config.get('model', '')}"
    return {"baseline": "natural subset", "label-solve": "Label Solve", "evaluate": "evaluate file"}.get(
        record["command"], record["method"])


def _selection_text(record: dict) -> str:
    sel = record["selection"]
    if sel.get("split") == "validation":
        return f"validation ({sel.get('val_size', '?')} images held out of train), step {sel.get('step')}"
    if sel.get("split") == "test":
        return f"TEST set, step {sel.get('step')} (reproducing the papers; not an unbiased estimate)"
    return "nothing selected"


def _run_figures(run_dir: pathlib.Path, record: dict, img_dir: pathlib.Path, name: str) -> list[tuple[str, str]]:
    """Draw this run's pictures into ``img_dir``; returns ``[(caption, file name), ...]``."""
    from kernel_distill.data import dataset_info
    from kernel_distill.io import load_distilled

    figures = []

    def add(caption, fig, suffix):
        file = f"{name}-{suffix}.png"
        plots.save_figure(img_dir / file, fig)
        figures.append((caption, file))

    artifacts, config = record.get("artifacts", {}), record["config"]
    # The reported support: KIP's selected one (distilled_best.npz), else the run's only one.
    distilled_name = artifacts.get("distilled_best") or artifacts.get("distilled")
    distilled_path = run_dir / distilled_name if distilled_name else None
    if distilled_path is None and config.get("file"):  # evaluate, transfer: the file they were given
        distilled_path = next((p for p in (run_dir / config["file"], pathlib.Path(config["file"])) if p.is_file()),
                              None)
        distilled_name = config["file"]
        if distilled_path is None and str(config["file"]).startswith("zoo:"):
            from kernel_distill import zoo

            try:
                distilled_path = pathlib.Path(zoo.resolve(config["file"], progress=False))
            except KernelDistillError:  # a set this installation does not have: no grid
                pass
    if distilled_path is not None and distilled_path.is_file():
        distilled = load_distilled(distilled_path)
        if distilled.preprocessor is not None:
            num_classes = distilled.num_classes
            try:
                class_names = dataset_info(record["dataset"]["name"]).class_names
            except KernelDistillError:
                class_names = None
            original = None
            n = len(distilled.images)
            # KIP and Label Solve keep the class-by-class order of the natural support they started from.
            if record["command"] in ("kip", "label-solve", "baseline") and not config.get("support") \
                    and n % num_classes == 0:
                original = np.repeat(np.arange(num_classes), n // num_classes)
            add("Support images, one row per original class; titles: the label's argmax class and value "
                "(red where it left the row's class)",
                plots.image_grid_figure(distilled.preprocessor.to_viewable(distilled.images), distilled.labels,
                                        num_classes, class_names, title=f"{distilled_name}",
                                        original_classes=original), "grid")
    metrics_file = run_dir / artifacts.get("metrics", "metrics.jsonl")
    if record["command"] == "kip" and metrics_file.is_file():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        add("KRR training loss, validation and test accuracy", plots.learning_curve_figure(records), "curve")
    curves = record.get("curves", {})
    if "label_covariance" in curves:
        add("Label Solve: covariance of the original (one-hot) and the solved labels",
            plots.heatmap_figure(np.asarray(curves["label_covariance"]), "original class (one-hot)",
                                 "solved label column"), "label-covariance")
    transfer = {k: v for k, v in curves.items() if k.startswith("transfer_")}
    if transfer:
        add("Finite-network test accuracy while training, per seed", plots.transfer_figure(transfer), "transfer")
    return figures


def _run_page(run_dir: pathlib.Path, record: dict, figures, name: str) -> str:
    metrics_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td class=\"num\">"
        f"{html.escape(_pct(v) + ' %' if 'accuracy' in k and isinstance(v, float) else json.dumps(v))}</td></tr>"
        for k, v in record["metrics"].items() if not isinstance(v, (list, dict)))
    warning = ""
    if record["selection"].get("split") == "test":
        warning = ("<p class=\"warning\"><b>Selected on the test set</b> (<code>--select-on test</code>, as the KIP "
                   "papers did): the reported accuracy of the selected support is optimistically biased.</p>")
    figures_html = "".join(f"<figure><img src=\"../img/{html.escape(file)}\" alt=\"{html.escape(caption)}\">"
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, file in figures)
    prov = record["provenance"]
    body = (f"<p><a href=\"../index.html\">&larr; all runs</a></p>"
            f"<h1>{html.escape(_label(record))} on {html.escape(str(record['dataset']['name']))}</h1>"
            f"<p>Run folder <code>{html.escape(str(run_dir))}</code>; command "
            f"<code>{html.escape(prov.get('command_line') or '')}</code></p>{warning}"
            f"<h2>Metrics</h2><p>Selection: {html.escape(_selection_text(record))}</p>"
            f"<table><tbody>{metrics_rows}</tbody></table>"
            f"<h2>Pictures</h2>{figures_html or '<p>(no pictures: the folder holds no distilled set or curves)</p>'}"
            f"<h2>Dataset</h2><pre>{html.escape(json.dumps(record['dataset'], indent=2))}</pre>"
            f"<h2>Config</h2><pre>{html.escape(json.dumps(record['config'], indent=2))}</pre>"
            f"<h2>Provenance</h2><pre>{html.escape(json.dumps(prov, indent=2))}</pre>")
    return _page(f"{_label(record)}: {name}", body)


def zoo_section(img_dir: pathlib.Path, img_prefix: str = "img/") -> str:
    """The distilled-set zoo as HTML: its table (from the index) and every set's image grid, drawn into
    ``img_dir`` as ``zoo-NAME.png``."""
    from kernel_distill import zoo
    from kernel_distill.data import dataset_info

    entries = zoo.read_index()
    if not entries:
        return "<h2>Distilled-set zoo</h2><p>(the zoo is empty)</p>"
    img_dir.mkdir(parents=True, exist_ok=True)
    header = "".join(f"<th>{html.escape(c)}</th>" for c in zoo.TABLE_HEADER)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip('`'))}</td>" for c in row) + "</tr>"
                   for row in zoo.table_rows(entries))
    figures = []
    for e in entries:
        distilled = zoo.load(e["name"])
        n, num_classes = len(distilled.images), distilled.num_classes
        original = np.repeat(np.arange(num_classes), n // num_classes) if n % num_classes == 0 else None
        if distilled.preprocessor is None:  # zoo sets are kernel-distill files, never released KIP files
            raise KernelDistillError(f"zoo set {e['name']} carries no preprocessing: it cannot be shown")
        fig = plots.image_grid_figure(distilled.preprocessor.to_viewable(distilled.images), distilled.labels,
                                      num_classes, dataset_info(e["dataset"]).class_names,
                                      title=f"zoo:{e['name']}", original_classes=original)
        plots.save_figure(img_dir / f"zoo-{e['name']}.png", fig)
        caption = (f"zoo:{e['name']}: {zoo.describe_method(e)}, {e['support_size']} images; KRR "
                   f"{100 * e['krr']['test_accuracy']:.2f}%; made by {e['command']}")
        figures.append(f"<figure id=\"zoo-{html.escape(e['name'])}\"><img src=\"{img_prefix}zoo-"
                       f"{html.escape(e['name'])}.png\" alt=\"{html.escape(caption)}\"><figcaption>"
                       f"{html.escape(caption)}</figcaption></figure>")
    return (f"<h2 id=\"zoo\">Distilled-set zoo</h2><p>The sets shipped with kernel-distill (use one as "
            f"<code>zoo:NAME</code>). KRR %: the file's own kernel on the whole test set; transfer %: the evaluation "
            f"ConvNet trained on the set, mean +- std over seeds (<code>kernel-distill zoo show NAME</code>). Grid "
            f"rows are the original classes; titles the label's argmax class and value.</p>"
            f"<table id=\"zoo-table\"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>"
            + "".join(figures))


@contextlib.contextmanager
def _staged(out_dir: pathlib.Path):
    """Build a report in a hidden folder inside ``out_dir`` and move it into place only once it is whole,
    ``index.html`` last: a failure (a bad run, a full disk, Ctrl-C) leaves the previous report or none,
    never half of one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".report-", suffix=".tmp", dir=out_dir))
    try:
        yield staging
        for name in ("runs", "img"):
            if (staging / name).is_dir():
                if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
                    shutil.rmtree(out_dir / name)
                os.replace(staging / name, out_dir / name)
        os.replace(staging / "index.html", out_dir / "index.html")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_zoo_report(out_dir: str | os.PathLike) -> pathlib.Path:
    """A page of the distilled-set zoo alone (``out_dir/index.html``, pictures in ``out_dir/img``)."""
    out_dir = pathlib.Path(out_dir)
    with _staged(out_dir) as staging:
        body = "<h1>kernel-distill: the distilled-set zoo</h1>" + zoo_section(staging / "img")
        atomic_write_text(staging / "index.html", _page("kernel-distill zoo", body))
    return out_dir / "index.html"


COLUMNS = ("run", "command", "method", "dataset", "support size", "test accuracy %", "gain over random (IOR)",
           "selected on", "date", "commit")


def build_report(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                 zoo: bool = False) -> pathlib.Path:
    """Write the report of ``run_dirs`` (see the module docstring) into ``out_dir``; returns index.html.

    ``zoo``: add the distilled-set zoo's table and image grids (:func:`zoo_section`).
    """
    out_dir = pathlib.Path(out_dir)
    runs = [(path, read_results(path)) for path in find_runs(run_dirs)]  # every record checked before writing
    with _staged(out_dir) as staging:
        _write_report(runs, staging, zoo)
    return out_dir / "index.html"


def _write_report(runs: list, out_dir: pathlib.Path, zoo: bool) -> None:
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    rows: list[str] = []
    points: list[dict] = []
    for run_dir, record in runs:
        name = _slug(run_dir, taken)
        figures = _run_figures(run_dir, record, out_dir / "img", name)
        atomic_write_text(out_dir / "runs" / f"{name}.html", _run_page(run_dir, record, figures, name))
        metrics, prov = record["metrics"], record["provenance"]
        accuracy, size = metrics.get("test_accuracy"), metrics.get("support_size")
        if accuracy is not None and size:
            points.append(dict(method=_label(record), dataset=record["dataset"]["name"], support_size=size,
                               test_accuracy=accuracy))
        cells = [(f"<a href=\"runs/{name}.html\">{html.escape(name)}</a>", name),
                 (html.escape(record["command"]), record["command"]), (html.escape(_label(record)), _label(record)),
                 (html.escape(str(record["dataset"]["name"])), record["dataset"]["name"]),
                 (str(size or ""), size if size else ""), (_pct(accuracy), accuracy if accuracy is not None else ""),
                 (_signed_points(metrics.get("ranking_ior")), metrics.get("ranking_ior", "")),
                 (html.escape(record["selection"].get("split", "")), record["selection"].get("split", "")),
                 (html.escape(prov.get("date") or ""), prov.get("date") or ""),
                 (html.escape((prov.get("git_commit") or "")[:10]), prov.get("git_commit") or "")]
        numeric = ' class="num"'
        rows.append("<tr>" + "".join(
            f"<td{numeric if i in (4, 5, 6) else ''} data-value=\"{html.escape(str(value))}\">{text}</td>"
            for i, (text, value) in enumerate(cells)) + "</tr>")
    plots.save_figure(out_dir / "img" / "accuracy-vs-size.png",
                      plots.accuracy_vs_size_figure(points, title="Test accuracy against support size"))
    header = "".join(f"<th class=\"sortable\">{html.escape(c)}</th>" for c in COLUMNS)
    test_selected = sum(r["selection"].get("split") == "test" for _, r in runs)
    note = (f"<p class=\"warning\">{test_selected} run(s) selected their support on the <b>test</b> set "
            f"(paper reproduction); their accuracies are optimistic.</p>") if test_selected else ""
    body = (f"<h1>kernel-distill report</h1><p>{len(runs)} run(s). Test accuracy is the reported support's "
            f"(for KIP: the support selected on the split in the \"selected on\" column). The gain over random "
            f"is DD-Ranking's IOR, in points, for transfer runs made with <code>--ranking</code>: the set's "
            f"accuracy minus that of random subsets of its size under the same recipe. Click a column header "
            f"to sort.</p>{note}"
            f"<figure><img src=\"img/accuracy-vs-size.png\" alt=\"test accuracy against support size\">"
            f"<figcaption>Test accuracy against support size, per method and dataset</figcaption></figure>"
            f"<table class=\"sortable\" id=\"runs\"><thead><tr>{header}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    if zoo:
        body += zoo_section(out_dir / "img")
    atomic_write_text(out_dir / "index.html", _page("kernel-distill report", body, SORT_SCRIPT))
