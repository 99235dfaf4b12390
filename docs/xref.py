"""Cross-references and source back-links that Sphinx leaves unresolved here (``sphinx -n -W``).

* **Aliases.** The package documents a name where users import it from
  (``lowrank_geom.inverse_root``) while docstrings often refer to it by its defining module
  (``lowrank_geom.geometry.psd.inverse_root``) or bare (``inverse_root``, ``Strategy.name``). A
  Python reference that Sphinx cannot resolve is resolved here when it names *one* documented
  object: the target imported (with the referring module as context) is the same object as a
  documented name, or exactly one documented name ends with ``.<target>``. Anything else stays
  a warning, so ``-n -W`` still catches references to undocumented or misspelled names.
* **External names** (``torch``, ``geoopt``, ``collections.abc``, ``typing``, ``numpy``) cannot
  resolve offline (intersphinx downloads inventories), so they render as plain code.
* **viewcode back-links.** :mod:`sphinx.ext.viewcode` links a source listing back to
  ``<module of the first documented object from that file>.<name>``; an object documented under
  another module path (``lowrank_geom.geometry.eigh_safe`` in a file whose first documented object
  was ``lowrank_geom.inverse_root``) would get a dead link, so its signature also gets that id.
"""

from __future__ import annotations

import pkgutil
import re

from docutils import nodes
from sphinx.util.nodes import make_refnode

EXTERNAL = re.compile(r"~?(torch|geoopt|collections\.abc|typing|numpy|peft|transformers)(\..+)?$")


def _import(dotted: str):
    """The object ``dotted`` names (modules imported as needed, then attributes), or None."""
    try:
        return pkgutil.resolve_name(dotted)
    except (ImportError, AttributeError, ValueError):
        return None


def _documented_by_object(env) -> dict[int, list[str]]:
    """``{id(object): [documented names]}`` over the Python domain, built once per build."""
    cache = getattr(env, "_xref_by_object", None)
    if cache is None or cache[0] != len(env.get_domain("py").objects):
        objects = env.get_domain("py").objects
        table: dict[int, list[str]] = {}
        for name in objects:
            obj = _import(name)
            if obj is not None:
                table.setdefault(id(obj), []).append(name)
        cache = (len(objects), table)
        env._xref_by_object = cache
    return cache[1]


def _candidates(env, node) -> list[str]:
    target = node["reftarget"].lstrip("~.")
    objects = env.get_domain("py").objects
    contexts = [node.get("py:module"), node.get("py:class") and f"{node.get('py:module')}.{node.get('py:class')}"]
    for context in [c for c in contexts if c]:
        obj = _import(f"{context}.{target}")
        if obj is not None and not isinstance(obj, (int, float, str, tuple)):
            names = _documented_by_object(env).get(id(obj), [])
            if names:
                return names
    obj = _import(target)
    if obj is not None and not isinstance(obj, (int, float, str, tuple)):
        names = _documented_by_object(env).get(id(obj), [])
        if names:
            return names
    roles = set(env.get_domain("py").objtypes_for_role(node.get("reftype")) or ())
    return [name for name, entry in objects.items() if name.endswith(f".{target}") and entry.objtype in roles]


def resolve_alias(app, env, node, contnode):
    """``missing-reference``: a Python reference to one documented object under another name."""
    if node.get("refdomain") != "py":
        return None
    if EXTERNAL.match(node["reftarget"]):
        return contnode  # rendered as code, not a link: no inventory offline
    names = sorted(set(_candidates(env, node)))
    if len(names) != 1:
        return None
    entry = env.get_domain("py").objects[names[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, names[0])


def add_viewcode_anchors(app, doctree, docname):
    """``doctree-resolved``: give each signature the id its viewcode back-link points at."""
    from sphinx import addnodes
    from sphinx.ext.viewcode import _get_full_modname

    modules = getattr(app.env, "_viewcode_modules", {})
    taken = {i for node in doctree.findall(nodes.Element) for i in node.get("ids", [])}
    for signode in doctree.findall(addnodes.desc_signature):
        module, fullname = signode.get("module"), signode.get("fullname")
        if not module or not fullname:
            continue
        entry = modules.get(_get_full_modname(module, fullname) or module)
        if not entry:
            continue
        anchor = f"{entry[3]}.{fullname}"
        if anchor not in taken:
            signode["ids"].append(anchor)
            taken.add(anchor)


def setup(app):
    app.connect("missing-reference", resolve_alias)
    app.connect("doctree-resolved", add_viewcode_anchors)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
