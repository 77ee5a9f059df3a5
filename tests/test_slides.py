"""The presentation (docs/slides.py, `make slides`): Marp renders the slides to HTML and PDF in
Debian's chromium, with every number taken from the report's generated summary."""

import json
import re
import shutil
import subprocess
import sys
import zlib

import pytest

from tests.worker import REPO


def pdf_pages(pdf):
    """The page objects of a PDF, in its plain text and in its compressed object streams
    (Chromium's PDFs keep them there)."""
    parts = [pdf]
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.DOTALL):
        try:
            parts.append(zlib.decompress(stream))
        except zlib.error:
            continue  # an image or a font, not objects
    return sum(len(re.findall(rb"/Type\s*/Page(?![s\w])", part)) for part in parts)


def test_make_slides_writes_the_pdf_with_the_reports_numbers(tmp_path):
    if not shutil.which("chromium"):
        pytest.skip("chromium is not installed: `make slides` needs it for the PDF (apt-get install chromium)")
    if not shutil.which("npm") and not (REPO / "docs" / "slides" / "node_modules" / ".bin" / "marp").exists():
        pytest.skip("npm is not installed: `make slides` installs Marp CLI with it (apt-get install npm)")
    out = tmp_path / "slides"
    result = subprocess.run(["make", "slides", f"SLIDES_OUT={out}"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    pdf = (out / "slides.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    pages = pdf_pages(pdf)
    assert 10 <= pages <= 15, pages
    assert (out / "slides.html").read_text().count("<section") == pages
    # The numbers are the report's: ROUGE-L of the base and the fine-tuned mean, the seeds, the examples.
    markdown = (out / "slides.md").read_text()
    facts = json.loads((REPO / "docs" / "report" / "results.json").read_text())
    rouge = facts["metrics"]["rouge_l"]
    spread = f" ± {rouge['sd']:.2f}" if len(rouge["runs"]) > 1 else ""  # one seed has no spread
    assert f"| {rouge['base']:.2f} | {rouge['mean']:.2f}{spread} |" in markdown
    assert f"All {facts['evaluation_examples']} held-out products" in markdown
    assert facts["examples"][0]["facts"] in markdown
    for name in facts["figures"].values():
        assert f"/report/{name})" in markdown


def test_slides_say_what_is_missing_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "docs/slides.py", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/nonexistent", "CHROME_PATH": ""},
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "slides: chromium is not installed (apt-get install chromium, or set CHROME_PATH): no PDF without it"
    )
    assert not (tmp_path / "slides.md").exists()
