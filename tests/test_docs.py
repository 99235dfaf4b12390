"""The documentation: API coverage of every public name, the results-publishing script, and the build.

The coverage tests parse the reST sources under ``docs/`` (``autofunction`` / ``autoclass`` /
``autoexception`` / ``automodule :members:``, with ``currentmodule``) and resolve each documented
name to its object, so a name counts as documented wherever it is documented (``lowrank_geom.X``
or ``lowrank_geom.geometry.X``), and a stale directive that no longer resolves fails too.

The build test runs ``sphinx -n -W --keep-going`` with the html and doctest builders in a
subprocess (as ``make docs`` does, so every cross-reference resolves and every example on the pages
runs), then checks the HTML: MathJax is loaded from the build itself (equations render offline) and
every source listing's back-link lands on an anchor. It is skipped when Sphinx, furo or
sphinx-mathjax-offline is not installed (the ``docs`` extra).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_DIRECTIVE = re.compile(
    r"^(?P<indent>\s*)\.\.\s+(?P<kind>auto(?:function|class|exception|data|method|attribute|module)"
    r"|currentmodule|py:currentmodule|module|py:module)::\s*(?P<arg>\S+)\s*$"
)
_OPTION = re.compile(r"^\s+:(?P<name>[\w-]+):\s*(?P<value>.*)$")


def _rst_sources() -> list[Path]:
    skip = {"_build", "_generated", "results"}
    return sorted(p for p in DOCS.rglob("*.rst") if not skip & set(p.relative_to(DOCS).parts))


def _resolve(dotted: str):
    """The object a dotted name refers to: import the longest module prefix, then getattr."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _module_members(module, members: str | None) -> list:
    if members:
        names = [n.strip() for n in members.split(",") if n.strip()]
    elif hasattr(module, "__all__"):
        names = list(module.__all__)
    else:
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        ]
    return [getattr(module, n) for n in names]


def _strategy_pages():
    spec = importlib.util.spec_from_file_location("strategy_pages", DOCS / "strategy_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented() -> dict[str, object]:
    """``{qualified name: object}`` for every object the reST sources document with autodoc
    (the generated pages of strategies without a hand-written page included)."""
    sources = [(path, path.read_text()) for path in _rst_sources()]
    generated = _strategy_pages().generated_pages()
    sources += [(DOCS / "strategies" / "_generated" / f"{name}.rst", text) for name, text in generated.items()]
    found: dict[str, object] = {}
    for path, text in sources:
        lines = text.splitlines()
        current = None
        for i, line in enumerate(lines):
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            kind, arg = m.group("kind"), m.group("arg")
            if kind in ("currentmodule", "py:currentmodule", "module", "py:module"):
                current = None if arg == "None" else arg
                continue
            if kind == "automodule":
                current = arg
                module = importlib.import_module(arg)
                found[arg] = module
                options = {}
                for follow in lines[i + 1 :]:
                    opt = _OPTION.match(follow)
                    if not opt:
                        break
                    options[opt.group("name")] = opt.group("value")
                if "members" in options:
                    for obj in _module_members(module, options["members"]):
                        found[f"{arg}.{getattr(obj, '__name__', repr(obj))}"] = obj
                continue
            # autodoc's rule: a dotted name is taken as given, a bare one is in the current module
            name = arg if current is None or "." in arg else f"{current}.{arg}"
            try:
                found[name] = _resolve(name)
            except (ImportError, AttributeError) as err:
                raise AssertionError(
                    f"{path.relative_to(ROOT)}:{i + 1}: `{line.strip()}` does not resolve: {err}"
                ) from err
    return found


def _public(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    return [(name, getattr(module, name)) for name in module.__all__]


@pytest.mark.parametrize(
    "module_name", ["lowrank_geom", "lowrank_geom.geometry", "lowrank_geom.strategies", "lowrank_geom.distributed"]
)
def test_every_public_name_is_in_the_api_reference(module_name):
    objects = documented()
    ids = {id(obj) for obj in objects.values()}
    missing = [f"{module_name}.{name}" for name, obj in _public(module_name) if id(obj) not in ids]
    assert not missing, f"public names without an autodoc entry under docs/ (add them to docs/api/*.rst): {missing}"


def test_peft_public_functions_are_documented():
    """lowrank_geom.peft is documented by ``automodule :members:`` (generated by conf.py when the
    module exists), which skips members without a docstring: every public function needs one."""
    if importlib.util.find_spec("lowrank_geom.peft") is None:
        pytest.skip("lowrank_geom/peft.py does not exist yet")
    pytest.importorskip("peft")
    module = importlib.import_module("lowrank_geom.peft")
    assert "/_generated/api_peft.rst" in (DOCS / "api" / "peft.rst").read_text()
    assert "automodule:: lowrank_geom.peft" in (DOCS / "conf.py").read_text()
    public = _module_members(module, None)
    functions = [f for f in public if inspect.isfunction(f) or inspect.isclass(f)]
    assert functions, "lowrank_geom.peft has no public functions"
    undocumented = [f.__name__ for f in functions if not inspect.getdoc(f)]
    assert not undocumented, f"lowrank_geom.peft functions without a docstring (autodoc skips them): {undocumented}"


def test_every_registered_strategy_has_a_page():
    """A hand-written page in docs/strategies/, or one generated from the strategy's docstring
    (docs/strategy_pages.py, written by conf.py before every build)."""
    from lowrank_geom import available_strategies, get_strategy

    pages = _strategy_pages()
    written, generated = pages.hand_written(), pages.generated_pages()
    assert set(written) | set(generated) == set(available_strategies())
    assert {"lora_rite", "scaled_gd", "scaled_adam", "one_sided_adagrad"} <= set(written)
    for name, text in generated.items():
        cls = type(get_strategy(name))
        assert pages.marker(name) in text and f".. autoclass:: {cls.__module__}.{cls.__qualname__}" in text
        assert (cls.__doc__ or "").strip(), (  # a class's __doc__ is its own, never inherited
            f"strategy {name!r} has no docstring for its generated page: give {cls.__qualname__} one, "
            f"or write docs/strategies/{name}.rst saying {pages.marker(name)}"
        )
    index = (DOCS / "strategies" / "index.rst").read_text()
    assert ".. include:: /_generated/strategy_toctree.rst" in index
    assert all(f"/strategies/_generated/{n}" in pages.toctree(sorted(generated)) for n in generated)


def test_every_benchmark_suite_has_a_page():
    publish = _publish_module()
    main = importlib.import_module("benchmarks.__main__")
    assert list(publish.SUITES) == list(main.SUITES)
    for suite in publish.SUITES:
        page = (DOCS / "benchmarks" / f"{suite}.rst").read_text()
        assert f".. include:: /_generated/results_{suite}.rst" in page


# ------------------------------------------------------------------------------ publishing


def _publish_module():
    spec = importlib.util.spec_from_file_location("publish_results", DOCS / "publish_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE_MD = """# invariance

Command: `python -m benchmarks invariance --out results` (size `default`, seed 0, 1.2 s, git 0123456789ab, torch 2.13.0, 2 threads on CPU)

| optimizer | gap | class |
|---|---|---|
| lora_rite | 1.20e-15 | GL(r) |
| `scaled_gd` (delta=0) | **3e-14** | - |
| a\\|b_ | x*y* |  |
| 1. | nan | none_ |

## float32

| a | b |
|---|---|
| 1 | 2 |

![invariance_gap](invariance_gap.png)
"""


def test_markdown_tables_become_warning_free_rst():
    docutils_core = pytest.importorskip("docutils.core")
    publish = _publish_module()
    rst = publish.markdown_to_rst(SAMPLE_MD)
    assert "# invariance" not in rst and ".. list-table::" in rst and ".. rubric:: float32" in rst
    assert ".. image:: /results/invariance_gap.png" in rst
    doctree = docutils_core.publish_doctree(
        rst, settings_overrides={"report_level": 5, "halt_level": 5, "warning_stream": False}
    )
    problems = [m.astext() for m in doctree.findall() if m.tagname == "system_message" and m["level"] >= 2]
    assert not problems, problems
    tables = [n for n in doctree.findall() if n.tagname == "table"]
    assert len(tables) == 2
    cells = [e.astext() for e in tables[0].findall() if e.tagname == "entry"]
    # every cell renders literally: markup characters, list-like text, empty cells
    assert cells == [
        "optimizer",
        "gap",
        "class",
        "lora_rite",
        "1.20e-15",
        "GL(r)",
        "scaled_gd (delta=0)",
        "3e-14",
        "-",
        "a|b_",
        "x*y*",
        "",
        "1.",
        "nan",
        "none_",
    ]


def test_publish_copies_results_and_writes_rst(tmp_path):
    publish = _publish_module()
    src, dst = tmp_path / "results", tmp_path / "docs_results"
    src.mkdir()
    payload = {
        "suite": "invariance",
        "run": {
            "command": "python -m benchmarks invariance --out results",
            "git_sha": "0123456789abcdef",
            "date": "2026-01-01T00:00:00+00:00",
        },
        "meta": {"torch": "2.13.0"},
        "metrics": {},
        "figures": ["invariance_gap.png"],
    }
    (src / "invariance.json").write_text(json.dumps(payload))
    (src / "invariance.md").write_text(SAMPLE_MD)
    (src / "invariance_gap.png").write_bytes(b"\x89PNG fake")
    dst.mkdir()
    (dst / "invariance.json").write_text(json.dumps(dict(payload, figures=["old_plot.png"])))
    (dst / "old_plot.png").write_bytes(b"stale")

    assert publish.main([str(src), str(dst)]) == 0
    for name in ("invariance.json", "invariance.md", "invariance_gap.png"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert not (dst / "old_plot.png").exists()  # the previous run's plot is gone
    rst = (dst / "invariance.rst").read_text()
    assert "   python -m benchmarks invariance --out results" in rst  # the exact command
    assert ":download:`invariance.json </results/invariance.json>`" in rst
    assert "``results/invariance.json``" in rst


def test_publish_into_a_docs_subfolder_points_images_there(tmp_path):
    publish = _publish_module()
    sub = DOCS / "results" / "x-subfolder-test"
    assert publish.image_prefix_for(sub) == "/results/x-subfolder-test/"
    assert publish.image_prefix_for(DOCS / "results") == "/results/"
    assert publish.image_prefix_for(tmp_path) == "/results/"  # outside the docs
    rst = publish.rst_for_suite("invariance", SAMPLE_MD, {"run": {}, "meta": {}}, "/results/sub/", "docs/results/sub")
    assert ".. image:: /results/sub/invariance_gap.png" in rst
    assert ":download:`invariance.json </results/sub/invariance.json>`" in rst
    assert "publish_results.py results docs/results/sub``" in rst


def test_publish_refuses_incomplete_results(tmp_path):
    publish = _publish_module()
    (tmp_path / "speed.json").write_text(json.dumps({"suite": "speed", "figures": []}))
    with pytest.raises(FileNotFoundError, match=r"speed\.md"):
        publish.publish(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------ the build


@pytest.mark.slow
def test_sphinx_build_is_warning_free_and_doctests_pass(tmp_path):
    """``make docs``: html and doctest builders with ``-W --keep-going``, offline (about 15 s)."""
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install -e '.[docs]')")
    pytest.importorskip("furo", reason="furo is not installed (pip install -e '.[docs]')")
    pytest.importorskip("sphinx-mathjax-offline", reason="sphinx-mathjax-offline is not installed (the docs extra)")
    doctrees = tmp_path / "doctrees"
    for builder in ("html", "doctest"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sphinx",
                "-n",
                "-W",
                "--keep-going",
                "-q",
                "-b",
                builder,
                "-d",
                str(doctrees),
                str(DOCS),
                str(tmp_path / builder),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        report = ""
        if builder == "doctest" and (tmp_path / builder / "output.txt").exists():
            report = (tmp_path / builder / "output.txt").read_text()[-4000:]
        assert proc.returncode == 0, (
            f"sphinx -b {builder} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}\n{report}"
        )
    assert (tmp_path / "html" / "index.html").exists()
    assert "0 failures in tests" in (tmp_path / "doctest" / "output.txt").read_text()
    check_mathjax_is_local(tmp_path / "html")
    assert not broken_viewcode_backlinks(tmp_path / "html")


def check_mathjax_is_local(html: Path) -> None:
    """Every page with math loads MathJax from the build's ``_static``, which holds it: no network."""
    pages = [p for p in html.rglob("*.html") if "_modules" not in p.parts and 'class="math' in p.read_text()]
    assert pages, "no page has math: the check no longer sees MathJax output"
    for page in pages:
        scripts = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', page.read_text(), re.I)
        assert scripts, f"{page.relative_to(html)} has math but loads no MathJax"
        for src in scripts:
            assert "://" not in src, f"{page.relative_to(html)} loads MathJax over the network: {src}"
            assert (page.parent / src.split("?")[0]).is_file(), f"{page.relative_to(html)}: {src} is not in the build"


def broken_viewcode_backlinks(html: Path) -> list[str]:
    """Back-links of the source listings (``_modules/``) whose page has no element with that id."""
    ids: dict[Path, set[str]] = {}
    broken = []
    for listing in (html / "_modules").rglob("*.html"):
        for href in re.findall(r'<a class="viewcode-back" href="([^"]+)"', listing.read_text()):
            page, _, anchor = href.replace("&amp;", "&").partition("#")
            target = (listing.parent / page).resolve()
            if target not in ids:
                ids[target] = set(re.findall(r'id="([^"]+)"', target.read_text())) if target.exists() else set()
            if anchor not in ids[target]:
                broken.append(f"{listing.relative_to(html)} -> {href}")
    return broken


def test_broken_viewcode_backlinks_are_found(tmp_path):
    """The checker above fails on a back-link to a missing anchor and passes a present one."""
    (tmp_path / "_modules").mkdir()
    (tmp_path / "page.html").write_text('<dt id="pkg.f">f</dt>')
    link = '<a class="viewcode-back" href="../page.html#{}">[docs]</a>'
    (tmp_path / "_modules" / "pkg.html").write_text(link.format("pkg.f") + link.format("pkg.g"))
    assert broken_viewcode_backlinks(tmp_path) == ["_modules/pkg.html -> ../page.html#pkg.g"]


_PLAIN_PYTHON = re.compile(r"^\s*\.\.\s+(?:code-block|code|sourcecode)::\s*(?:python|py|pycon|python3)\s*$", re.M)


def test_every_python_example_is_doctested():
    """Python on a page is ``doctest`` / ``testcode``, which ``make docs`` runs, never a plain code block."""
    plain = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
        for path in _rst_sources()
        for text in [path.read_text()]
        for m in _PLAIN_PYTHON.finditer(text)
    ]
    assert not plain, "Python code blocks that no builder runs (make them testcode or doctest):\n" + "\n".join(plain)
    assert _PLAIN_PYTHON.search(".. code-block:: python\n") and not _PLAIN_PYTHON.search(".. code-block:: bash\n")


@pytest.mark.parametrize("name", ["LoRARITE", "ScaledGD", "ScaledAdam", "OneSidedAdagrad"])
def test_named_optimizer_docstrings_list_every_hyperparameter(name):
    """``LoRARITE`` and its siblings name every hyperparameter of their strategy in their docstring."""
    import torch

    import lowrank_geom

    cls = getattr(lowrank_geom, name)
    pair = (torch.nn.Parameter(torch.randn(6, 2)), torch.nn.Parameter(torch.randn(5, 2)))
    strategy = lowrank_geom.get_strategy(cls([pair]).param_groups[0]["strategy"])
    missing = [key for key in strategy.defaults if f"``{key}``" not in (cls.__doc__ or "")]
    assert not missing, f"{name}'s docstring does not name {missing}"


# ------------------------------------------------------------------------------ generated pages


def _docs_module(name: str):
    sys.path.insert(0, str(DOCS))  # the generators import each other's reST helpers
    try:
        spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(DOCS))
    return module


def _lr_guide():
    return _docs_module("lr_guide")


def test_lr_guide_tables_come_from_the_published_json():
    """Every optimizer of the fine-tune JSON is a row with its selected lr and every lr of its grid."""
    guide = _lr_guide()
    if not guide.FINETUNE.exists():
        pytest.skip("no published fine-tune result of every optimizer")
    payload = json.loads(guide.FINETUNE.read_text())
    text = guide.finetune_table(payload)
    for name, entry in payload["metrics"]["optimizers"].items():
        row = text.split(f"   * - ``{name}``\n", 1)[1].split("   * - ", 1)[0]
        assert f"     - {guide._g(entry['lr'])}\n" in row
        for lr in entry["lr_grid_selection_loss"]:
            assert f"{guide._g(float(lr))}" in row
    assert ".. include:: /_generated/lr_guide.rst" in (DOCS / "choosing.rst").read_text()


def test_lr_guide_without_results_says_how_to_make_them(tmp_path, monkeypatch):
    guide = _lr_guide()
    monkeypatch.setattr(guide, "FINETUNE", tmp_path / "none.json")
    monkeypatch.setattr(guide, "ROBUSTNESS", tmp_path / "none.json")
    text = guide.page()
    assert guide.ALL_COMMAND in text and "python -m benchmarks robustness" in text


def test_numerics_tables_come_from_the_published_json():
    """Every gap of the engine rows and every row of the conditioning sweep is printed from the JSONs."""
    tables = _docs_module("numerics_tables")
    if not (tables.INVARIANCE.exists() and tables.ROBUSTNESS.exists()):
        pytest.skip("no published invariance or robustness result")
    invariance = json.loads(tables.INVARIANCE.read_text())
    text = tables.invariance_table(invariance)
    names = [n for n in tables.GAUGE_ROWS if n in invariance["metrics"]["optimizers"]]
    assert names, "none of the engine rows is in the published invariance result"
    for name in names:
        row = text.split(f"   * - ``{name}``\n", 1)[1].split("   * - ", 1)[0]
        for gaps in invariance["metrics"]["optimizers"][name]["gaps"].values():
            for gauge, gap in gaps.items():
                assert not gauge.startswith("cond=") or f"     - {tables._e(gap)}\n" in row, (name, gauge)
    conditioning = json.loads(tables.ROBUSTNESS.read_text())["metrics"]["conditioning"]
    text = tables.conditioning_table({"metrics": {"conditioning": conditioning}})
    for row in conditioning["rows"]:
        assert f"{tables._e(row['error_median'])} ({tables._e(row['error_max'])})" in text
    page = (DOCS / "numerics.rst").read_text()
    assert ".. include:: /_generated/numerics_conditioning.rst" in page and "cond(factor)" not in page


def test_numerics_tables_without_results_say_how_to_make_them(tmp_path, monkeypatch):
    tables = _docs_module("numerics_tables")
    monkeypatch.setattr(tables, "INVARIANCE", tmp_path / "none.json")
    monkeypatch.setattr(tables, "ROBUSTNESS", tmp_path / "none.json")
    text = tables.page()
    assert "python -m benchmarks invariance" in text and "python -m benchmarks robustness" in text


def test_readme_result_table_is_the_published_one():
    """The README's table is ``publish_results.readme_block`` of the committed result, not typed."""
    sys.path.insert(0, str(DOCS))
    try:
        import publish_results
    finally:
        sys.path.remove(str(DOCS))
    md = DOCS / "results" / f"{publish_results.README_SUITE}.md"
    assert md.exists(), (
        f"{md} is not published: run `python docs/publish_results.py results docs/results --readme README.md`"
    )
    readme = (ROOT / "README.md").read_text()
    block = readme.split(publish_results.README_BEGIN, 1)[1].split(publish_results.README_END, 1)[0]
    assert block.strip() == publish_results.readme_block(md.read_text()).strip()


def test_every_test_the_docs_name_exists():
    """The docs cite tests as proof (``test_x`` or ``file.py::test_x``): each must be a test function."""
    defined = {
        m.group(1)
        for path in (ROOT / "tests").rglob("test_*.py")
        for m in re.finditer(r"^def (test_\w+)\(", path.read_text(), re.M)
    }
    cited = {
        (path.relative_to(DOCS), m.group(1))
        for path in _rst_sources()
        for m in re.finditer(r"``(?:[\w/.]+::)?(test_\w+)``", path.read_text())
    }
    assert cited, "the docs cite no test: the pattern no longer matches"
    missing = sorted(f"{where}: {name}" for where, name in cited if name not in defined)
    assert not missing, "docs cite tests that do not exist:\n" + "\n".join(missing)
