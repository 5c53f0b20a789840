"""Table sizes from a converter's ``meta.json`` (``data.meta_path``), instead of copying them into YAML.

The converters (:mod:`datasets.taobao`) and the synthetic generator (:mod:`datasets.synthetic`) write
``meta.json`` beside the data with ``table_sizes``: table name (``t_<table>``, :attr:`IdFeature.table_name`)
-> rows, e.g. ``{"t_user_id": 988, "t_item_id": 4163, ...}``. With ``data.meta_path`` set, an id feature in
YAML may omit ``num_embeddings`` (or set it to 0): its size comes from there. A size YAML does give must
agree with the meta.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional

from datasets.schema import SchemaConfig

__all__ = ["apply_table_sizes", "read_table_sizes"]


def read_table_sizes(meta_path: str | os.PathLike) -> dict[str, int]:
    """``table_sizes`` of a converter's ``meta.json``: table name -> rows.

    Raises:
        ValueError: the file is missing or unreadable, is not JSON, or has no ``table_sizes`` object of
            positive integers; the message names the file.
    """
    path = Path(meta_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(
            f"data.meta_path: {path} does not exist (a converter's meta.json, written by python -m datasets.taobao "
            f"or datasets.synthetic beside the data)"
        ) from None
    except OSError as e:
        raise ValueError(f"data.meta_path: cannot read {path}: {e.strerror or e}") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"data.meta_path: {path} is not JSON ({e})") from None
    sizes = meta.get("table_sizes") if isinstance(meta, dict) else None
    if not isinstance(sizes, dict):
        raise ValueError(f"data.meta_path: {path} has no 'table_sizes' object; expected a converter's meta.json")
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v <= 0}
    if bad:
        raise ValueError(f"data.meta_path: {path}: table_sizes must be positive integers, got {bad}")
    return dict(sizes)


def apply_table_sizes(schema: SchemaConfig, meta_path: Optional[str | os.PathLike]) -> SchemaConfig:
    """A copy of ``schema`` whose id features take ``num_embeddings`` from ``meta_path``'s ``table_sizes``.

    Call it before :meth:`SchemaConfig.validate` (which refuses ``num_embeddings`` 0): with a meta, 0 means
    "from the meta"; without one (``meta_path`` None) ``schema`` comes back unchanged (a copy), and a 0
    is still an error at validation.

    Args:
        schema: the schema from YAML; an id feature's ``num_embeddings`` is 0 (unset: from the meta) or the
            size the meta must agree with.
        meta_path: a converter's ``meta.json`` (relative paths are relative to the working directory, like
            ``train_paths``), or None.

    Returns:
        The schema with every id feature's ``num_embeddings`` from the meta (features sharing a table get
        the same size); ``schema`` itself is not modified.

    Raises:
        ValueError: unreadable meta (see :func:`read_table_sizes`); an id feature whose table is absent from
            the meta's ``table_sizes``; a size in YAML that disagrees with the meta (naming the table, both
            numbers and the file).
    """
    out = copy.deepcopy(schema)
    if meta_path is None:
        return out
    sizes = read_table_sizes(meta_path)
    for f in out.id_features:
        table = f.table_name
        if table not in sizes:
            raise ValueError(
                f"id feature {f.name}: table {table} is not in the table_sizes of {meta_path} "
                f"(it has {', '.join(sorted(sizes))})"
            )
        if f.num_embeddings not in (0, sizes[table]):
            raise ValueError(
                f"id feature {f.name}: data.schema sets num_embeddings {f.num_embeddings} for table {table}, but "
                f"{meta_path} says {sizes[table]}; drop num_embeddings (or set it to 0) to take the meta's"
            )
        f.num_embeddings = sizes[table]
    return out
