"""Reading a user's data file (CSV, TSV, JSONL or JSON) into texts and labels, once."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import GradLoraError
from .data import TextData


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise GradLoraError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise GradLoraError(f"{path}: line {n} is not a JSON object")
                rows.append(row)
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise GradLoraError(f"{path}: a .json data file must hold a list of objects")
        return data
    raise GradLoraError(
        f"{path}: unknown data file type {suffix!r}; use .csv, .tsv, .jsonl or .json"
    )


def read_data_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str | None = "label",
    label_required: bool = False,
) -> tuple[TextData, list[str] | None, list[str]]:
    """(data, label names, the file's columns) from a CSV/TSV/JSONL/JSON file.

    With a ``label_column`` present: classification. Labels that are all integers are used as
    class ids; any other labels (e.g. "pos"/"neg") are numbered in sorted order and their names
    returned. Without it (or label_column None): text only, for causal language modelling.
    Rows with empty text are dropped; a row with text but no label is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise GradLoraError(f"data file not found: {path}")
    rows = _read_rows(path)
    if not rows:
        raise GradLoraError(f"{path}: the data file is empty (no rows)")
    columns = list(rows[0].keys())
    if text_column not in columns:
        raise GradLoraError(
            f"{path}: no column {text_column!r}; the columns are {columns} "
            "(choose one with --text-column)"
        )
    if label_required and label_column not in columns:
        raise GradLoraError(
            f"{path}: no column {label_column!r}; the columns are {columns} "
            "(choose one with --label-column)"
        )
    use_labels = label_column is not None and label_column in columns
    texts, raw = [], []
    for n, row in enumerate(rows, 1):
        text = row.get(text_column)
        text = "" if text is None else str(text).strip()
        if not text:
            continue
        texts.append(text)
        if use_labels:
            label = row.get(label_column)
            if label is None or str(label).strip() == "":
                raise GradLoraError(f"{path}: row {n} has text but no {label_column!r}")
            raw.append(str(label).strip())
    if not texts:
        raise GradLoraError(f"{path}: no row has any text in column {text_column!r}")
    if not use_labels:
        return TextData(texts), None, columns
    try:
        ids = [int(v) for v in raw]
    except ValueError:
        names = sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        return TextData(texts, [index[v] for v in raw]), names, columns
    if min(ids) < 0:
        raise GradLoraError(f"{path}: integer labels must be >= 0 (found {min(ids)})")
    return TextData(texts, ids), None, columns


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
