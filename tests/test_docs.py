"`make docs`: the site builds (notebooks not executed), every notebook has a page, the API shows docments, search works offline, links resolve."
import html
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
from fastcore.docments import docments

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO = ROOT / "data" / "demo" / "results" / "summary.ipynb"
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb")) + sorted((ROOT / "experiments").glob("*.ipynb"))


pytestmark = pytest.mark.slow   # builds the whole site (every notebook rendered)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    "The site as `make docs` builds it, without executing the notebooks; --strict: a link to nothing fails the build."
    out = tmp_path_factory.mktemp("docs")
    env = dict(os.environ, EDANB_DOCS_EXECUTE="false", EDANB_DOCS_CACHE=str(out / "cache"), NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(out / "site")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return out / "site"


def page_of(notebook: Path) -> str:
    "Where the site puts a notebook's page: the repository's layout, with nbs/index.ipynb as the home page."
    page = notebook.relative_to(ROOT).with_suffix(".html").as_posix()
    return "index.html" if page == "nbs/index.html" else page


def text(page: Path) -> str:
    "What a reader sees of a page: no tags, entities decoded."
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def title(notebook: Path) -> str:
    "The notebook's first heading, without markdown markup."
    first = nbformat.read(notebook, as_version=4).cells[0].source.splitlines()[0]
    return re.sub(r"[`*]", "", first.lstrip("# "))


class Refs(HTMLParser):
    "Every href/src and every id in an HTML page."
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()
    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None: self.links.append(value)
            if name in ("id", "name") and value: self.ids.add(value)


def refs(page: Path) -> Refs:
    parser = Refs()
    parser.feed(page.read_text(errors="replace"))
    return parser


def broken_links(site: Path) -> list[str]:
    "Internal links of every page that point at no file, or at an id that the other page does not have."
    ids, out = {}, []
    for page in sorted(site.rglob("*.html")):
        if page.relative_to(site) == Path("404.html"): continue  # for web servers: its links are root-absolute
        for link in refs(page).links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith("#"): continue  # http(s), mailto, data:, same page
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page.resolve()
            if not target.is_file(): out.append(f"{page.relative_to(site)}: {link}"); continue
            if parts.fragment and target.suffix == ".html" and target != page.resolve():
                if target not in ids: ids[target] = refs(target).ids
                if unquote(parts.fragment) not in ids[target]: out.append(f"{page.relative_to(site)}: {link} (no such id)")
    return out


def test_every_notebook_has_a_page(site):
    for notebook in NOTEBOOKS:
        page = site / page_of(notebook)
        assert page.is_file(), f"{notebook.relative_to(ROOT)}: no page {page_of(notebook)}"
        assert title(notebook) in text(page), f"{page_of(notebook)} does not show {notebook.name}"
    for page in (site / "nbs").glob("*.html"):  # nbdev's `#| hide` cells and directives are not shown
        assert "nbdev.nbdev_export()" not in text(page) and "#| export" not in text(page), page.name


def test_navigation_in_pipeline_order(site):
    links = [l for l in refs(site / "index.html").links if re.fullmatch(r"(nbs|experiments)/[^/#]+\.html", l)]
    nav = list(dict.fromkeys(links))
    assert nav == [page_of(nb) for nb in NOTEBOOKS if nb.name != "index.ipynb"]


def test_demo_summary_page(site):
    page = text(site / "data" / "demo" / "results" / "summary.html")
    if DEMO.is_file(): assert "The study's table" in page and "data:image/png" in (site / "data" / "demo" / "results" / "summary.html").read_text()
    else: assert "make demo" in page and "Not built yet" in page


def test_api_pages_show_docments(site):
    from edanb.core import pearson
    from edanb.metrics import make_loss
    from edanb.train import fit
    for module, fn in (("train", fit), ("metrics", make_loss), ("core", pearson)):
        page = text(site / "api" / f"{module}.html")
        assert f"def {fn.__name__}(" in page, f"api/{module}.html has no {fn.__name__}"
        assert fn.__doc__ in page
        for param, doc in docments(fn).items():
            if doc: assert doc in page, f"api/{module}.html: {fn.__name__}'s {param} is missing its docment {doc!r}"
    modules = {p.stem for p in (ROOT / "edanb").glob("*.py") if not p.name.startswith("_")}
    assert modules == {p.stem for p in (site / "api").glob("*.html")}


def test_search_works_offline(site):
    script = (site / "search" / "search_index.js").read_text()
    assert script.startswith("var __index = ")
    docs = json.loads(script.removeprefix("var __index = "))["docs"]
    pages = {d["location"].split("#")[0] for d in docs}
    assert {"nbs/06_train.html", "api/train.html", "index.html"} <= pages
    assert any("make_loss" in d["text"] for d in docs if d["location"].startswith("api/metrics.html"))
    page = (site / "nbs" / "00_data.html").read_text()
    config = json.loads(re.search(r'<script id="__config" type="application/json">(.*?)</script>', page).group(1))
    assert (site / "nbs" / config["search"]).resolve().is_file()  # the search worker
    assert '<script src="../assets/iframe-worker-shim.js">' in page and "unpkg.com" not in page  # no network


def test_internal_links_resolve(site):
    assert broken_links(site) == []
    assert (site / "nbs" / "images" / "demo_r_ccc.png").is_file()  # the README's figure, linked from the home page


def test_broken_links_are_found(tmp_path):
    (tmp_path / "a.html").write_text('<a href="b.html#here">ok</a> <a href="b.html#gone">x</a> <img src="nope.png">'
                                     '<a href="https://example.org/x">ext</a> <a href="#local">same page</a>')
    (tmp_path / "b.html").write_text('<h2 id="here">here</h2>')
    assert broken_links(tmp_path) == ["a.html: b.html#gone (no such id)", "a.html: nope.png"]
