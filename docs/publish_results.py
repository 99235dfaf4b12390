"""Publish benchmark results into the documentation.

``python docs/publish_results.py results docs/results --readme README.md``.

The benchmark CLI (``python -m benchmarks <suite> --out results``) writes, per suite,
``results/<suite>.json`` (metrics, config, command, versions), ``results/<suite>.md`` (the
command line and the Markdown table) and PNG plots. This script copies those files unchanged
into ``docs/results/`` (which is committed) and writes ``docs/results/<suite>.rst``, a reST
rendering of ``<suite>.md`` (Sphinx without MyST cannot include Markdown). The benchmark pages
include that ``.rst`` and show the PNGs; nothing in a results table is ever typed by hand.

Only the standard library is used, so ``conf.py`` can import :func:`markdown_to_rst` and the
script runs without the package installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

#: the suites of ``python -m benchmarks``, in the order the docs present them
SUITES = ("invariance", "robustness", "convex", "regret", "speed", "finetune")

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)\s*$")
_HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
_SEPARATOR_CELL = re.compile(r"^:?-{1,}:?$")
_ENUMERATOR = re.compile(r"^(\d+|[a-zA-Z]|[ivxlcdmIVXLCDM]+)[.)]\s")
_CODE = re.compile(r"(`+)(.+?)\1")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _escape(text: str) -> str:
    """Backslash-escape every character that could start reST inline markup."""
    return re.sub(r"([\\`*_|\[\]<>:])", r"\\\1", text)


def _inline(text: str) -> str:
    """Markdown inline text (code spans, bold) as reST, robust inside words and table cells."""
    text = text.strip()
    out = []
    pos = 0
    for match in _CODE.finditer(text):
        out.append(_plain(text[pos : match.start()]))
        code = match.group(2).strip()
        # escaped whitespace around the literal lets it touch neighbouring characters
        out.append("\\ ``" + code.replace("``", "` `") + "``\\ ")
        pos = match.end()
    out.append(_plain(text[pos:]))
    result = "".join(out)
    # escaped whitespace is only needed between markup and a neighbouring character
    if result.startswith("\\ "):
        result = result[2:]
    if result.endswith("\\ "):
        result = result[:-2]
    return result


def _plain(text: str) -> str:
    out = []
    pos = 0
    for match in _BOLD.finditer(text):
        out.append(_escape(text[pos : match.start()]))
        out.append("\\ **" + _escape(match.group(1).strip()) + "**\\ ")
        pos = match.end()
    out.append(_escape(text[pos:]))
    return "".join(out)


def _cell(text: str) -> str:
    cell = _inline(text.replace("\\|", "|"))
    if not cell:
        return ""  # an empty list item is an empty cell
    # a cell that looks like a list marker or enumerator would become a nested list
    if cell[0] in "-+#=" or _ENUMERATOR.match(cell + " "):
        cell = "\\" + cell
    return cell


def _split_row(line: str) -> list[str]:
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def _table(lines: list[str]) -> list[str]:
    rows = [_split_row(line) for line in lines]
    header_rows = 0
    if len(rows) >= 2 and rows[1] and all(_SEPARATOR_CELL.match(c) for c in rows[1]):
        header_rows = 1
        rows = [rows[0]] + rows[2:]
    width = max(len(r) for r in rows)
    out = [".. list-table::"]
    if header_rows:
        out.append("   :header-rows: 1")
    out.append("")
    for row in rows:
        row = row + [""] * (width - len(row))
        for j, cell in enumerate(row):
            out.append((("   * - " if j == 0 else "     - ") + _cell(cell)).rstrip())
    out.append("")
    return out


def markdown_to_rst(md: str, image_prefix: str = "/results/", drop_title: bool = True) -> str:
    """The Markdown that ``benchmarks.common.write_result`` writes, as reST.

    Handles what that writer produces: ``#`` headings (the first, the suite name, is dropped
    because the page has its own title; later ones become rubrics, so an included file can never
    clash with the page's section levels), paragraphs with ``code`` and **bold**, GitHub pipe
    tables (→ ``list-table``) and image lines ``![alt](file.png)`` (→ ``image`` with the path
    prefixed by ``image_prefix``, relative to the Sphinx source dir). Everything else is escaped
    so it renders literally: the output never depends on reST-sensitive characters in the data.
    """
    lines = md.splitlines()
    out: list[str] = []
    para: list[str] = []
    table: list[str] = []
    seen_title = False

    def flush() -> None:
        if para:
            out.append(_inline(" ".join(p.strip() for p in para)))
            out.append("")
            para.clear()
        if table:
            out.extend(_table(table))
            table.clear()

    for raw in lines:
        line = raw.rstrip()
        if line.lstrip().startswith("|"):
            if para:
                flush()
            table.append(line)
            continue
        if table:
            flush()
        if not line.strip():
            flush()
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            if drop_title and not seen_title and heading.group("level") == "#":
                seen_title = True
                continue
            out.append(".. rubric:: " + _inline(heading.group("text")))
            out.append("")
            continue
        image = _IMAGE.match(line.strip())
        if image:
            flush()
            src = image.group("src")
            if not re.match(r"^[a-z]+://", src):
                src = image_prefix + Path(src).name
            out.append(f".. image:: {src}")
            out.append(f"   :alt: {image.group('alt') or Path(src).stem}")
            out.append("")
            continue
        para.append(line)
    flush()
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def rst_for_suite(
    suite: str,
    md: str,
    payload: dict | None,
    image_prefix: str = "/results/",
    dst: str = "docs/results",
    src: str = "results",
) -> str:
    """The ``docs/results/<suite>.rst`` of one suite: how to reproduce it, then its ``.md`` as reST."""
    head = [
        f".. Generated by docs/publish_results.py from {src}/{suite}.md and {src}/{suite}.json;",
        "   do not edit. Re-run the benchmark and the script instead.",
        "",
    ]
    if payload is not None:
        run = payload.get("run", {})
        meta = payload.get("meta", {})
        command = run.get("command") or f"python -m benchmarks {suite}"
        head += [
            f"Reproduce (then publish with ``python docs/publish_results.py {src} {dst}``):",
            "",
            ".. code-block:: bash",
            "",
            f"   {command}",
            "",
            f"Raw results: ``{src}/{suite}.json`` (published copy: "
            f":download:`{suite}.json <{image_prefix}{suite}.json>`), written "
            f"{_escape(str(run.get('date', 'at an unknown date')))} at git "
            f"``{str(run.get('git_sha', 'unknown'))[:12]}`` with torch "
            f"``{meta.get('torch', '?')}``.",
            "",
        ]
    return "\n".join(head).rstrip("\n") + "\n\n" + markdown_to_rst(md, image_prefix=image_prefix)


def image_prefix_for(dst: Path) -> str:
    """The Sphinx path of ``dst``: ``/results/`` for ``docs/results``, ``/results/x/`` for a subfolder ``x``.

    A folder outside ``docs/`` keeps ``/results/`` (its files are not part of the built docs).
    """
    try:
        rel = dst.resolve().relative_to(Path(__file__).resolve().parent)
    except ValueError:
        return "/results/"
    return "/" + rel.as_posix().strip("/") + "/"


def publish(src: Path, dst: Path, suites: list[str] | None = None) -> list[str]:
    """Copy ``<src>/<suite>.{json,md}`` and the suite's PNGs to ``dst`` and write ``<suite>.rst``.

    Images and downloads in the ``.rst`` point into ``dst`` (:func:`image_prefix_for`), so a
    second result of a suite can live in a subfolder, e.g. ``docs/results/finetune-all``.
    """
    dst.mkdir(parents=True, exist_ok=True)
    prefix = image_prefix_for(dst)
    shown = dst.as_posix() if not dst.is_absolute() else "docs" + prefix.rstrip("/")
    src_shown = src.name if src.is_absolute() else src.as_posix()
    found = sorted(p.stem for p in src.glob("*.json"))
    wanted = suites or found
    done = []
    for suite in wanted:
        js, md = src / f"{suite}.json", src / f"{suite}.md"
        if not js.exists() or not md.exists():
            raise FileNotFoundError(
                f"{suite}: need both {js} and {md} (run `python -m benchmarks {suite} --out {src}`)"
            )
        payload = json.loads(js.read_text())
        if payload.get("suite") != suite:
            raise ValueError(f"{js} is the result of suite {payload.get('suite')!r}, not {suite!r}")
        old = dst / f"{suite}.json"
        if old.exists():  # figures a previous run published and this one no longer makes
            for name in json.loads(old.read_text()).get("figures", []):
                stale = dst / Path(name).name
                if stale.exists() and not (src / Path(name).name).exists():
                    stale.unlink()
        figures = [Path(f).name for f in payload.get("figures", [])]
        text = md.read_text()
        figures += [Path(m.group("src")).name for m in map(_IMAGE.match, text.splitlines()) if m]
        for name in dict.fromkeys(figures):
            if not (src / name).exists():
                raise FileNotFoundError(f"{suite}: figure {src / name} listed in the results is missing")
            shutil.copy2(src / name, dst / name)
        shutil.copy2(js, dst / js.name)
        shutil.copy2(md, dst / md.name)
        (dst / f"{suite}.rst").write_text(rst_for_suite(suite, text, payload, prefix, shown, src_shown))
        done.append(suite)
    return done


#: the README shows this suite's first table, between these markers, refreshed by :func:`readme_block`
README_SUITE = "invariance"
README_BEGIN = "<!-- results:invariance:begin (written by docs/publish_results.py; do not edit) -->"
README_END = "<!-- results:invariance:end -->"


def readme_block(md: str) -> str:
    """The README's results block: the ``Command:`` line and the first table of ``<suite>.md``."""
    lines = md.splitlines()
    command = next((l for l in lines if l.startswith("Command:")), None)
    if command is None:
        raise ValueError(f"{README_SUITE}.md has no 'Command:' line")
    start = next((i for i, l in enumerate(lines) if l.startswith("|")), None)
    if start is None:
        raise ValueError(f"{README_SUITE}.md has no table")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    heading = next((l.lstrip("# ") for l in reversed(lines[:start]) if l.startswith("#")), "")
    return "\n".join([command, "", f"**{heading}**" if heading else "", "", *lines[start:end]]).replace(
        "\n\n\n", "\n\n"
    )


def update_readme(readme: Path, md: str) -> bool:
    """Replace the text between the README markers by :func:`readme_block`; ``True`` if it changed."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} lacks the markers {README_BEGIN!r} ... {README_END!r}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = head + README_BEGIN + "\n" + readme_block(md) + "\n" + README_END + tail
    readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the benchmark results folder (python -m benchmarks --out)")
    parser.add_argument("dst", type=Path, help="where the docs read them: docs/results")
    parser.add_argument(
        "--suite", action="append", choices=SUITES, help="only these suites (default: every JSON in src)"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help=f"also refresh this README's {README_SUITE} table (between its markers)",
    )
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"{args.src} is not a folder; run `python -m benchmarks all --out {args.src}` first")
    done = publish(args.src, args.dst, args.suite)
    if not done:
        print(f"no <suite>.json in {args.src}: nothing published", file=sys.stderr)
        return 1
    for suite in done:
        print(f"published {suite}: {args.dst / (suite + '.rst')}")
    if args.readme is not None:
        md = args.dst / f"{README_SUITE}.md"
        if not md.exists():
            parser.error(f"--readme needs {md}: publish the {README_SUITE} suite first")
        update_readme(args.readme, md.read_text())
        print(f"refreshed the {README_SUITE} table in {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
