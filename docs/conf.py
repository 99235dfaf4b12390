"""Sphinx configuration for lowrank_geom.

Builds offline with ``-W`` (no intersphinx: it fetches inventories over the network). Before
Sphinx reads any source, :func:`generate` writes ``docs/_generated/`` (git-ignored):

* ``results_<suite>.rst``: the published benchmark result of a suite
  (``docs/results/<suite>.rst``, written by ``docs/publish_results.py``; converted from
  ``docs/results/<suite>.md`` here if only that exists), or a "not yet generated" note with the
  commands that make it. The benchmark pages include these, so they build with or without
  results. :data:`EXTRA_RESULTS` do the same for a suite's second result in a subfolder.
* ``benchdoc_<suite>.rst``: the module docstring of ``benchmarks/<suite>.py`` (or of the package
  ``benchmarks/<suite>/``; read with
  :mod:`ast`, never imported), or a note while that module does not exist.
* ``api_peft.rst``: ``automodule`` of :mod:`lowrank_geom.peft` when that module exists.
* ``strategy_toctree.rst`` and ``docs/strategies/_generated/<name>.rst``: a page, from its
  docstring, for every registered strategy without a hand-written one (``strategy_pages.py``).
* ``lr_guide.rst``: the learning-rate tables of ``choosing.rst`` from the published fine-tune
  and robustness JSONs (``lr_guide.py``).
* ``numerics_conditioning.rst``: the conditioning tables of ``numerics.rst`` from the published
  invariance and robustness JSONs (``numerics_tables.py``).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))  # publish_results (conversion of the benchmark Markdown)
sys.path.insert(0, str(ROOT))  # the package, also when it is not installed

import lr_guide  # noqa: E402
import numerics_tables  # noqa: E402
import strategy_pages  # noqa: E402
from publish_results import SUITES, rst_for_suite  # noqa: E402

import lowrank_geom  # noqa: E402

project = "lowrank_geom"
author = "lowrank_geom contributors"
copyright = "lowrank_geom contributors, Apache-2.0"
release = lowrank_geom.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    # MathJax 3.2.2 copied into _build/html/_static/mathjax: equations render without a network
    "sphinx-mathjax-offline",
    "xref",  # docs/xref.py: aliases of documented names, external names as code, viewcode anchors
]

# results/ holds the published benchmark files (.rst there are include-only, never documents)
exclude_patterns = ["_build", "_generated", "results", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# -- autodoc / napoleon --------------------------------------------------------------------
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": False}
# geoopt is imported only by lowrank_geom.geometry.manifold; its import warnings are not ours
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script(_method)?` is deprecated")

# -- doctest ---------------------------------------------------------------------------------
doctest_global_setup = """
import importlib.util
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
# the PEFT examples need the optional extra and lowrank_geom.peft
HAVE_PEFT = (importlib.util.find_spec("peft") is not None
             and importlib.util.find_spec("lowrank_geom.peft") is not None)
# the FSDP2 recipe runs as one gloo process
HAVE_FSDP2 = HAVE_PEFT and torch.distributed.is_available() and torch.distributed.is_gloo_available()
# the Trainer how-to needs transformers' Trainer, which needs accelerate
HAVE_TRAINER = HAVE_PEFT and importlib.util.find_spec("accelerate") is not None
"""
doctest_test_doctest_blocks = "default"  # the >>> examples in docstrings run too

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"lowrank_geom {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # the text column uses a 1280 px window; table cells wrap
html_show_sourcelink = True
pygments_style = "sphinx"
pygments_dark_style = "monokai"


# -- generated sources -------------------------------------------------------------------------
def _results_rst(suite: str, folder: str = "results") -> str:
    results = DOCS / folder
    rst, md, js = results / f"{suite}.rst", results / f"{suite}.md", results / f"{suite}.json"
    if rst.exists():
        return f".. include:: /{folder}/{suite}.rst\n"
    if md.exists():
        import json

        payload = json.loads(js.read_text()) if js.exists() else None
        return rst_for_suite(suite, md.read_text(), payload, f"/{folder}/", f"docs/{folder}")
    return (
        ".. note::\n\n"
        f"   Not yet generated: no published result for the ``{suite}`` suite in ``docs/{folder}``. Run\n\n"
        "   .. code-block:: bash\n\n"
        f"      python -m benchmarks {suite} --out results\n"
        f"      python docs/publish_results.py results docs/{folder}\n\n"
        f"   and rebuild; this section then shows ``docs/{folder}/{suite}.md`` (the table and the\n"
        f"   command that produced it) and its plots, with ``results/{suite}.json`` linked.\n"
    )


_PY_ROLE = re.compile(r":(?:py:)?(?:func|class|data|mod|meth|attr|obj|exc):`([^`]+)`")


def _benchdoc_rst(suite: str) -> str:
    module = ROOT / "benchmarks" / f"{suite}.py"
    if not module.exists():  # a suite that is a package: its docstring is the package's
        module = ROOT / "benchmarks" / suite / "__init__.py"
    name = module.relative_to(ROOT).as_posix()
    if not module.exists():
        return f"*benchmarks/{suite}.py is not written yet; the set-up above is the specification it implements.*\n"
    try:
        doc = ast.get_docstring(ast.parse(module.read_text()))
    except SyntaxError:
        doc = None
    if not doc:
        return f"*{name} has no module docstring yet.*\n"
    # the benchmark modules are not part of the API reference: their cross-references are code
    doc = _PY_ROLE.sub(lambda m: f"``{m.group(1).lstrip('~')}``", doc)
    return f"From the module docstring of ``{name}``:\n\n{doc.strip()}\n"


def _api_peft_rst() -> str:
    if (ROOT / "lowrank_geom" / "peft.py").exists():
        return ".. automodule:: lowrank_geom.peft\n   :members:\n"
    return (
        ".. note::\n\n"
        "   ``lowrank_geom/peft.py`` is not in this checkout yet; its reference appears here\n"
        "   automatically once it is.\n"
    )


#: generated name -> (suite, folder under docs/) of the results published besides ``make bench``'s
EXTRA_RESULTS = {
    # every optimizer of the fine-tune comparison (docs/benchmarks/finetune.rst)
    "results_finetune_all.rst": ("finetune", "results/finetune-all"),
    # Tong, Ma & Chi's sizes (docs/benchmarks/convex.rst)
    "results_convex_full.rst": ("convex", "results/convex-full"),
}


def generate() -> None:
    """Write ``docs/_generated/*.rst`` (see the module docstring)."""
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    for suite in SUITES:
        lr_guide.write_if_changed(out / f"results_{suite}.rst", _results_rst(suite))
        lr_guide.write_if_changed(out / f"benchdoc_{suite}.rst", _benchdoc_rst(suite))
    for name, (suite, folder) in EXTRA_RESULTS.items():
        lr_guide.write_if_changed(out / name, _results_rst(suite, folder))
    lr_guide.write_if_changed(out / "api_peft.rst", _api_peft_rst())
    strategy_pages.generate()
    lr_guide.generate()
    numerics_tables.generate()


generate()
