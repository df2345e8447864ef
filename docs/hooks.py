"""MkDocs hooks for `make docs`: every notebook as a page in pipeline order, an API reference, links that work offline.

The notebooks stay where they are. Each build stages copies in a temporary folder, laid out like the repository
(`nbs/00_data.ipynb` becomes `nbs/00_data.html`), with nbdev's directives applied the way `nbdev_test` and nbdev's
own docs apply them: `#| hide` cells run but are not shown, `#| eval: false`, `nbdev_export()` and test-flag cells
are not run, and a library notebook runs from `nbs/` like under `nbdev_test`. The API pages are generated here from
nbdev's `show_doc` (docstrings and docments); none of this is committed.
"""
import hashlib
import importlib
import inspect
import logging
import posixpath
import re
import reprlib
import shutil
import tempfile
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
from bs4 import BeautifulSoup
from fastcore.docments import MarkdownRenderer
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.utils import get_relative_url
from nbdev.config import get_config
from nbdev.process import extract_directives, first_code_ln
from nbdev.showdoc import show_doc

ROOT = Path(__file__).resolve().parents[1]
DEMO = "data/demo/results/summary.ipynb"  # written by `make demo`
HIDE = {"remove-cell": None, "remove-input": ".jp-Cell-inputWrapper", "remove-output": ".jp-Cell-outputWrapper"}
log = logging.getLogger("mkdocs.hooks.edanb")
_build = {}  # this build's staging folder and the repository files its pages link to


def library_notebooks() -> list[str]:
    "nbs/*.ipynb in pipeline order (the file names' numbers), index first."
    names = sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb") if p.name != "index.ipynb")
    return ["nbs/index.ipynb"] + [f"nbs/{n}" for n in names]


def site_path(notebook: str) -> str:
    "Where a notebook's page goes: the repository's layout, with nbs/index.ipynb as the home page."
    return "index.ipynb" if notebook == "nbs/index.ipynb" else notebook


def modules() -> list[tuple[str, str]]:
    "(module, notebook) for every notebook with a `#| default_exp`, in pipeline order."
    out = []
    for notebook in library_notebooks():
        for cell in nbformat.read(ROOT / notebook, as_version=4).cells:
            if cell.cell_type == "code" and (exp := extract_directives(cell, remove=False).get("default_exp")):
                out.append((exp[0], notebook))
                break
    return out


def on_config(config):
    "The navigation, in pipeline order: home, library notebooks, experiment notebooks, the demo's summary, API."
    notebooks = library_notebooks()
    config.nav = [
        {"Home": site_path(notebooks[0])},
        {"Notebooks": [{Path(nb).stem: site_path(nb)} for nb in notebooks[1:]]},
        {"Experiments": [{p.name: f"experiments/{p.name}"} for p in sorted((ROOT / "experiments").glob("*.ipynb"))]},
        {"Demo summary": DEMO},
        {"API reference": [{f"edanb.{m}": f"api/{m}.md"} for m, _ in modules()]},
    ]
    return config


def _strip_directives(source: str) -> str:
    lines = source.splitlines(True)
    code = first_code_ln(lines)
    if code is None: code = len(lines)
    return "".join(l for l in lines[:code] if not re.match(r"\s*#\s*\|", l)) + "".join(lines[code:])


def test_flags() -> set[str]:
    "The cell flags that `nbdev_test` skips (settings.ini's tst_flags)."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # nbdev's notice about settings.ini's `cell_number`
        return set(get_config(path=ROOT).tst_flags.split("|")) - {""}


def stage_notebook(src: Path, dst: Path, cwd: Path, library: str):
    "Copy a library notebook for the site: nbdev's directives as cell tags, run from `cwd`, keyed to the library."
    nb, skip = nbformat.read(src, as_version=4), test_flags()
    cells = [nbformat.v4.new_code_cell(f"import os; os.chdir({str(cwd)!r})", metadata={"tags": ["remove-cell"]},
                                       id="edanb-docs-cwd")]  # a fixed id: the page's cache key is the notebook's bytes
    for cell in nb.cells:
        if cell.cell_type == "code":
            d, tags = extract_directives(cell, remove=False), set(cell.metadata.get("tags", []))
            first = lambda k: d.get(k, [""])[0].lower()
            if "hide" in d or first("include:") == "false": tags.add("remove-cell")
            if "hide_input" in d or first("echo:") == "false": tags.add("remove-input")
            if "hide_output" in d or first("output:") == "false": tags.add("remove-output")
            if "nbdev_export(" in cell.source or first("eval:") == "false" or skip & d.keys(): tags.add("skip-execution")
            cell.source = _strip_directives(cell.source)
            if not cell.source.strip(): continue  # a cell of directives only, like `#| default_exp`
            cell.metadata["tags"] = sorted(tags)
        cells.append(cell)
    nb.cells = cells
    nb.metadata["edanb_docs"] = {"library": library}  # mkdocs-jupyter's cache key: re-run when edanb/ changes
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)


def missing_demo(dst: Path):
    "A page that says how to make the demo summary."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "# Demo summary\n\nNot built yet: `data/demo/results/summary.ipynb` is written by `make demo`, which runs the "
        "whole study on synthetic data (about 10 minutes on 2 cores). Run `make demo`, then `make docs` again, and "
        "this page shows the executed summary: the study's table, the comparison plots and the answers.",
        id="edanb-docs-demo")])
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)


def _documented(mod) -> list[tuple[str, object]]:
    "(name, object) of the module's exported functions and classes, each class followed by its documented methods."
    out = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != mod.__name__: continue
        out.append((name, obj))
        if inspect.isclass(obj):
            out += [(f"{name}.{k}", v) for k, v in vars(obj).items() if not k.startswith("_")
                    and (inspect.isfunction(v) or isinstance(v, property)) and v.__doc__]
    return out


def api_page(module: str, notebook: str) -> str:
    "Markdown reference of one module: nbdev's `show_doc` (signature, docments, docstring) of each exported symbol."
    mod = importlib.import_module(f"edanb.{module}")
    lines = [f"# edanb.{module}", "", f"Exported from [{Path(notebook).name}](../{site_path(notebook)}), where each "
             "symbol is explained and tested; the parameters' comments are their docments.", ""]
    constants = [n for n in mod.__all__ if not callable(getattr(mod, n))]
    if constants:
        short = reprlib.Repr()
        short.maxstring = short.maxother = 80
        lines += ["```python"] + [f"{n} = {short.repr(getattr(mod, n))}" for n in constants] + ["```", ""]
    for name, obj in _documented(mod):
        doc = show_doc(obj, renderer=MarkdownRenderer, name=name)
        if not obj.__doc__: doc.docs = ""  # not the docstring of `type.__call__` or of a base class
        lines += [f"{'####' if '.' in name else '###'} {name}", "", doc._repr_markdown_(), ""]
    return "\n".join(lines)


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    "Stage the notebooks, add them, the images and the generated API pages to the site."
    stage = Path(tempfile.mkdtemp(prefix="edanb-docs-"))
    _build.update(stage=stage, copies=set())
    library = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((ROOT / "edanb").glob("*.py")))).hexdigest()
    for notebook in library_notebooks():
        stage_notebook(ROOT / notebook, stage / site_path(notebook), (ROOT / notebook).parent, library)
    (stage / "experiments").mkdir()
    for src in sorted((ROOT / "experiments").glob("*.ipynb")):  # papermill templates: rendered as they are
        shutil.copy(src, stage / "experiments" / src.name)
    if (ROOT / DEMO).is_file():  # already executed by `make demo`
        (stage / DEMO).parent.mkdir(parents=True)
        shutil.copy(ROOT / DEMO, stage / DEMO)
    else: missing_demo(stage / DEMO)
    for path in sorted(p for p in stage.rglob("*.ipynb")):
        files.append(File(path.relative_to(stage).as_posix(), str(stage), config.site_dir, config.use_directory_urls))
    for path in sorted(p for p in (ROOT / "nbs" / "images").rglob("*") if p.is_file()):
        files.append(File(path.relative_to(ROOT).as_posix(), str(ROOT), config.site_dir, config.use_directory_urls))
    for module, notebook in modules():
        files.append(File.generated(config, f"api/{module}.md", content=api_page(module, notebook)))
    return files


def _resolve(url: str, page, files) -> str | None:
    "The site-relative URL for a relative link in a notebook page, or None when it points at nothing."
    parts = urlsplit(url)
    path = unquote(parts.path)
    home = page.file.src_uri == "index.ipynb"  # nbs/index.ipynb: links written for README.md, else for nbs/
    for base in (["", "nbs"] if home else [posixpath.dirname(page.file.src_uri)]):
        target = posixpath.normpath(posixpath.join(base, path))
        if target == "nbs/index.ipynb": target = "index.ipynb"
        if target.startswith("../"): continue
        found = files.get_file_from_path(target)
        if found is not None: dest = found.url
        elif (ROOT / target).is_file(): _build["copies"].add(dest := target)  # copied into the site at the end
        else: continue
        return get_relative_url(dest, page.url) + (f"#{parts.fragment}" if parts.fragment else "")
    return None


def on_page_content(html, page, config, files):
    "Notebook pages: remove hidden cells, point links at pages (.ipynb -> .html) and at files copied into the site."
    if not page.file.src_uri.endswith(".ipynb"): return html
    if "celltag_remove-" not in html and not re.search(r'(href|src)="(?![a-z]+:|#)', html): return html  # nothing to do
    soup = BeautifulSoup(html, "html.parser")
    for tag, part in HIDE.items():
        for cell in soup.select(f".celltag_{tag}"):
            for el in ([cell] if part is None else cell.select(part)): el.decompose()
    for el in soup.find_all(["a", "img", "source", "video", "audio", "iframe"]):
        attr = "href" if el.name == "a" else "src"
        url = el.get(attr)
        if not url or url.startswith("#") or urlsplit(url).scheme or url.startswith("/"): continue
        new = _resolve(url, page, files)
        if new is None: log.warning(f"{page.file.src_uri}: link '{url}' points at no page or file")
        else: el[attr] = new
    return str(soup)


def on_post_build(config):
    "Copy the repository files that notebook pages link to (not pages themselves), then drop the staging folder."
    for target in sorted(_build.get("copies", ())):
        dest = Path(config.site_dir) / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / target, dest)
    _cleanup()


def on_build_error(error):
    _cleanup()


def _cleanup():
    if stage := _build.pop("stage", None): shutil.rmtree(stage, ignore_errors=True)
