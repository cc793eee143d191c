"""The HTML report: built from real (small) runs of every command, checked as files and in headless Chromium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; ``.ci/run``
installs them and sets ``KERNEL_DISTILL_REQUIRE_BROWSER=1``, so on CI a missing browser fails instead of
skipping. The screenshot is kept in ``test-artifacts/`` (or ``$KERNEL_DISTILL_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import pytest

from kernel_distill.cli import main
from kernel_distill.report import build_report
from kernel_distill.results import read_results

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One small run of each command that produces a result, on digits (about 15 s on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("runs")
    commands = {
        "kip": ["kip", "--dataset", "digits", "--per-class", "2", "--steps", "20", "--eval-every", "10",
                "--learn-labels", "--target-batch", "200"],
        "kip-test": ["kip", "--dataset", "digits", "--per-class", "1", "--steps", "10", "--eval-every", "5",
                     "--target-batch", "200", "--select-on", "test"],
        "ls": ["label-solve", "--dataset", "digits", "--support-size", "20"],
        "base": ["baseline", "--dataset", "digits", "--per-class", "3", "--seeds", "2"],
        "transfer": ["transfer", "--natural-per-class", "2", "--dataset", "digits", "--model", "fc", "--width", "16",
                     "--steps", "10", "--eval-every", "5", "--seeds", "2"],
    }
    for name, argv in commands.items():
        assert main([*argv, "--out", str(root / name), "--no-progress"]) == 0, name
    assert main(["evaluate", str(root / "kip" / "distilled_best.npz"), "--dataset", "digits", "--out",
                 str(root / "eval"), "--no-progress"]) == 0
    return root


def test_every_command_writes_a_valid_results_json(runs):
    commands = {read_results(path)["command"] for path in runs.iterdir()}
    assert commands == {"kip", "label-solve", "baseline", "transfer", "evaluate"}
    kip = read_results(runs / "kip")
    assert kip["selection"]["split"] == "validation" and kip["selection"]["val_size"] == 200
    assert kip["dataset"]["num_val"] == 200 and kip["dataset"]["num_train"] == 1438 - 200
    assert read_results(runs / "kip-test")["selection"]["split"] == "test"


def test_report_files(runs, tmp_path):
    index = build_report([runs], tmp_path / "report")
    text = index.read_text()
    pages = re.findall(r'href="(runs/[^"]+\.html)"', text)
    assert len(pages) == 6
    assert "selected their support on the <b>test</b> set" in text
    for page in ["index.html", *pages]:
        html = (tmp_path / "report" / page).read_text()
        for src in re.findall(r'<img src="([^"]+)"', html):
            assert (tmp_path / "report" / page).parent.joinpath(src).resolve().is_file(), (page, src)
        assert "http://" not in html and "https://" not in html  # nothing fetched from a network
    kip_page = next(p for p in pages if p.endswith("kip.html"))
    kip_html = (tmp_path / "report" / kip_page).read_text()
    for picture in ("grid", "curve"):
        assert f"-{picture}.png" in kip_html
    assert "validation (200 images held out of train)" in kip_html
    ls_html = (tmp_path / "report" / next(p for p in pages if p.endswith("ls.html"))).read_text()
    assert "label-covariance.png" in ls_html


def test_cli_report_prints_the_index(runs, tmp_path, capsys):
    assert main(["report", str(runs / "kip"), str(runs / "ls"), "--out", str(tmp_path / "r")]) == 0
    assert str((tmp_path / "r" / "index.html").resolve()) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2
    assert "no such folder" in capsys.readouterr().err


def _browser():
    """A headless Chromium driven by selenium, or a skip (a failure on CI) naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = [name for name, found in (("chromium", chromium), ("chromedriver (chromium-driver)", driver),
                                        ("selenium", webdriver)) if not found]
    if missing:
        message = f"NO BROWSER TEST: {', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("KERNEL_DISTILL_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


BROKEN_IMAGES = """return Array.from(document.images)
    .filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.getAttribute("src"));"""


def _load(browser, path: pathlib.Path) -> tuple[list, list]:
    """Open a page; return (console errors, images that did not load)."""
    browser.get(path.resolve().as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    return errors, browser.execute_script(BROKEN_IMAGES)


def test_report_in_chromium(runs, tmp_path):
    index = build_report([runs], tmp_path / "report")
    browser = _browser()
    try:
        errors, broken = _load(browser, index)
        assert errors == [] and broken == []
        assert len(browser.execute_script("return document.images")) == 1
        header = browser.find_element("xpath", "//th[normalize-space()='test accuracy %']")
        column = [th.text for th in browser.find_elements("css selector", "#runs th")].index("test accuracy %")

        def accuracies():
            return [float(row.find_elements("tag name", "td")[column].get_attribute("data-value"))
                    for row in browser.find_elements("css selector", "#runs tbody tr")]

        assert len(accuracies()) == 6
        header.click()
        assert accuracies() == sorted(accuracies()) and header.get_attribute("data-order") == "ascending"
        header.click()
        assert accuracies() == sorted(accuracies(), reverse=True)
        artefacts = pathlib.Path(os.environ.get("KERNEL_DISTILL_TEST_ARTIFACTS", REPO / "test-artifacts"))
        artefacts.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(artefacts / "report-index.png"))
        for link in [a.get_attribute("href") for a in browser.find_elements("css selector", "#runs a")]:
            browser.get(link)
            page_errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
            assert page_errors == [] and browser.execute_script(BROKEN_IMAGES) == [], link
            assert len(browser.execute_script("return document.images")) >= 1, link
        # The checks can fail: a missing picture and a throwing script are both caught.
        (tmp_path / "report" / "img" / "accuracy-vs-size.png").unlink()
        errors, broken = _load(browser, index)
        assert broken == ["img/accuracy-vs-size.png"]
        index.write_text(index.read_text().replace("</body>", "<script>undefinedFunction();</script></body>"))
        errors, _ = _load(browser, index)
        assert any("undefinedFunction" in e["message"] for e in errors)
    finally:
        browser.quit()


def test_docs_format_lists_every_field_the_commands_write(runs):
    """docs/FORMAT.md matches the code: every top-level, provenance and metrics key written is documented."""
    from kernel_distill.results import PROVENANCE_KEYS, REQUIRED

    doc = (REPO / "docs" / "FORMAT.md").read_text()
    section = doc[doc.index("## The result record"):]
    for key in (*REQUIRED, *PROVENANCE_KEYS, "curves", "artifacts"):
        assert f"`{key}`" in section, key
    rows = {line.split("|")[1].strip(" `"): line for line in section.splitlines()
            if line.startswith("| `") and line.count("|") == 3}
    for path in runs.iterdir():
        record = read_results(path)
        row = rows[record["command"]]
        for key in record["metrics"]:
            assert f"`{key}`" in row or key in ("support_size", "num_test"), (record["command"], key)
