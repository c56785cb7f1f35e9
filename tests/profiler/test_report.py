"""report.html: one self-contained page, parsed as HTML: settings, chance levels, figures embedded, table links."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

import pytest

from attnprof.cli import main
from attnprof.report import render_report
from attnprof.singlecell.demo import write_demo_inputs


class Page(HTMLParser):
    """Headings, table rows (cell texts), image sources and links of an HTML page."""

    def __init__(self, html: str):
        super().__init__()
        self.headings, self.rows, self.images, self.links, self.title = [], [], [], [], ""
        self._in, self._text, self._row = None, [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2", "h3", "td", "th", "title"):
            self._in, self._text = tag, []
        if tag == "tr":
            self._row = []
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])

    def handle_data(self, data):
        if self._in:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag != self._in:
            if tag == "tr" and self._row is not None:
                self.rows.append(self._row)
                self._row = None
            return
        text = " ".join("".join(self._text).split())
        if tag in ("h1", "h2", "h3"):
            self.headings.append(text)
        elif tag == "title":
            self.title = text
        elif self._row is not None:
            self._row.append(text)
        self._in = None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    inputs = write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=60, n_genes=50, seed=5)
    out = tmp_path_factory.mktemp("run")
    argv = ["run", str(inputs["data.h5ad"]), "--groupby", "sex", "--model", str(inputs["model.ckpt"]),
            "--vocab", str(inputs["vocab.txt"]), "--means", str(inputs["means.npy"]), "--panel", "Esr1,Ar",
            "--window", "16", "--permutations", "4", "--threads", "1", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_report_is_one_self_contained_page(run):
    html = (run / "report.html").read_text()
    page = Page(html)
    assert page.title == "attnprof report: female vs male"
    assert page.headings[:2] == ["Attention differences: female − male", "Run"]
    for section in ("Layers", "Top heads", "Top genes", "Figures", "Tables"):
        assert section in page.headings
    assert "src=\"http" not in html and "<script" not in html  # nothing fetched, nothing run
    assert len(page.images) == 3  # layer curves, head heatmaps, maps
    for src in page.images:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64" and base64.b64decode(data).startswith(b"\x89PNG")
    assert {"tables/genes.csv", "tables/heads.csv", "tables/context.csv", "tables/genes.h5ad"} <= set(page.links)
    assert all((run / link).is_file() for link in page.links)


def test_report_shows_settings_and_chance_levels(run):
    page = Page((run / "report.html").read_text())
    settings = {row[0]: row[1] for row in page.rows if len(row) == 2}
    assert settings["groups (cells)"] == "female (30), male (30)" and settings["backend"] == "torch"
    assert settings["command"].startswith("attnprof run ") and "--permutations 4" in settings["command"]
    header = next(r for r in page.rows if r and r[0] == "layer")
    assert header[:9] == ["layer", "mean |D|", "noise floor", "rms diff", "null mean", "null 95th pct", "excess", "p_perm",
                          "p_fwer"]
    gene_header = next(r for r in page.rows if r and r[:3] == ["layer", "head", "gene"])
    assert "cells female" in gene_header and "cells male" in gene_header


def test_report_escapes_names_and_reads_without_permutations_or_figures(run):
    from attnprof import Profile

    profile = Profile.load(run / "profile.npz")
    profile.groups = ["<b>female</b>", "male"]
    html = render_report(profile.compare(0, 1, permutations=0), settings={"data": "<script>x</script>"})
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;female&lt;/b&gt;" in html
    page = Page(html)
    assert page.images == [] and "null mean" not in sum(page.rows, [])
    assert "No permutations" in html and "attnprof plot" in html
    assert "Cells are treated as independent replicates" in html  # no replicate key: the page says so
