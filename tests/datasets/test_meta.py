"""Tests of datasets.meta: table sizes from the meta.json of the synthetic generator and the Taobao converter
(on synthetic rows), YAML sizes that agree or disagree, and bad meta files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from datasets.config import DataConfig
from datasets.meta import apply_table_sizes, read_table_sizes
from datasets.reader import eval_loader
from datasets.schema import FloatFeature, IdFeature, SchemaConfig
from datasets.synthetic import SyntheticParams, generate, synthetic_schema
from datasets.taobao import TaobaoParams, convert, taobao_schema

TINY = SyntheticParams(num_samples=200, num_eval_samples=50, num_users=30, num_items=300, num_categories=20,
                       num_clusters=4, max_seq_len=40, files=1, row_group_size=64, seed=0)

#: data.schema as YAML gives it with data.meta_path: no num_embeddings anywhere, one set to 0
YAML = """
schema:
  id_features:
    - {name: user_id}
    - {name: item_id, table: item_id}
    - {name: item_category, table: item_category, num_embeddings: 0}
    - {name: hist_item_id, sequence: true, table: item_id}
    - {name: hist_category, sequence: true, table: item_category}
  float_features:
    - {name: hist_time_delta, sequence: true}
  labels: [label]
  group_column: user_id
"""


def yaml_schema(**sizes: int) -> SchemaConfig:
    """The schema of :data:`YAML` with ``num_embeddings`` set on the named features."""
    schema = SchemaConfig(
        id_features=[
            IdFeature("user_id"),
            IdFeature("item_id", table="item_id"),
            IdFeature("item_category", table="item_category"),
            IdFeature("hist_item_id", sequence=True, table="item_id"),
            IdFeature("hist_category", sequence=True, table="item_category"),
        ],
        float_features=[FloatFeature("hist_time_delta", sequence=True)],
    )
    for name, n in sizes.items():
        schema.id_feature(name).num_embeddings = n
    return schema


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("meta") / "synthetic"
    return out, generate(out, TINY)


def test_sizes_from_the_synthetic_meta(synthetic: tuple[Path, dict]) -> None:
    out, meta = synthetic
    assert read_table_sizes(out / "meta.json") == meta["table_sizes"] == {
        "t_user_id": 31, "t_item_id": 301, "t_item_category": 21, "t_hist_behavior_type": 5}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(YAML),
                                              {"meta_path": str(out / "meta.json")}))
    assert cfg.meta_path == str(out / "meta.json")
    assert [f.num_embeddings for f in cfg.schema.id_features] == [0] * 5
    schema = apply_table_sizes(cfg.schema, cfg.meta_path)
    assert [f.num_embeddings for f in cfg.schema.id_features] == [0] * 5  # the input is left alone
    assert [f.num_embeddings for f in schema.id_features] == [31, 301, 21, 301, 21]
    schema.validate()
    want = synthetic_schema(TINY).table_sizes()
    assert schema.table_sizes() == {k: v for k, v in want.items() if k != "t_hist_behavior_type"}
    cfg.schema = schema
    cfg.eval_paths = [str(out / "eval" / "*.parquet")]
    assert sum(int(b.valid.sum()) for b in eval_loader(cfg, 0, 1)) == 50


def test_sizes_from_the_taobao_meta(tmp_path: Path) -> None:
    """Synthetic UserBehavior rows (3 users, 2 with >= 20 pv events) through the converter."""
    rows = [f"{u},{10 + (k * 7 + 3 * u) % 200},{k % 4},pv,{1511000000 + k}"
            for u, n in ((5, 30), (9, 12), (2, 25)) for k in range(n)]
    (tmp_path / "ub.csv").write_text("\n".join(rows) + "\n")
    meta = convert(tmp_path / "ub.csv", tmp_path / "out", TaobaoParams(min_pv=20, train_targets=2, max_len=10))
    schema = apply_table_sizes(yaml_schema(user_id=4), tmp_path / "out" / "meta.json")  # 3 users + padding
    want = taobao_schema(meta).table_sizes()
    assert schema.table_sizes() == {k: v for k, v in want.items() if k != "t_hist_behavior_type"}
    assert schema.id_feature("hist_item_id").num_embeddings == len({r.split(",")[1] for r in rows}) + 1 == 56


def test_without_meta_a_missing_size_is_a_validation_error() -> None:
    schema = apply_table_sizes(yaml_schema(user_id=7), None)
    assert schema == yaml_schema(user_id=7) and schema is not yaml_schema(user_id=7)
    with pytest.raises(ValueError, match=r"id feature item_id: num_embeddings must be > 0, got 0"):
        schema.validate()


def test_a_size_that_disagrees_with_the_meta(synthetic: tuple[Path, dict]) -> None:
    out, _ = synthetic
    path = out / "meta.json"
    assert apply_table_sizes(yaml_schema(item_id=301, hist_item_id=301), path).table_sizes()["t_item_id"] == 301
    with pytest.raises(ValueError) as e:
        apply_table_sizes(yaml_schema(hist_item_id=300), path)
    assert str(e.value) == (
        f"id feature hist_item_id: data.schema sets num_embeddings 300 for table t_item_id, but {path} says 301; "
        "drop num_embeddings (or set it to 0) to take the meta's"
    )


def test_a_table_the_meta_does_not_have(synthetic: tuple[Path, dict]) -> None:
    out, _ = synthetic
    schema = yaml_schema()
    schema.id_features.append(IdFeature("hist_shop_id", 50, sequence=True))
    match = (r"id feature hist_shop_id: table t_hist_shop_id is not in the table_sizes of .*meta\.json "
             r"\(it has t_hist_behavior_type, t_item_category, t_item_id, t_user_id\)")
    with pytest.raises(ValueError, match=match):
        apply_table_sizes(schema, out / "meta.json")


@pytest.mark.parametrize(
    "content, match",
    [
        (None, r"data\.meta_path: .*nope\.json does not exist"),
        ("{not json", r"data\.meta_path: .*nope\.json is not JSON"),
        (json.dumps({"num_ids": {}}), r"data\.meta_path: .*nope\.json has no 'table_sizes' object"),
        (json.dumps({"table_sizes": {"t_user_id": 0}}),
         r"table_sizes must be positive integers, got \{'t_user_id': 0\}"),
    ],
)
def test_bad_meta_files(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "nope.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        apply_table_sizes(yaml_schema(), path)
