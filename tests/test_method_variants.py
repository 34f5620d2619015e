"""Method variants (``<base>@<tag>``): names, registry order, file names, cost specs."""

import json

import pytest

from attribution.methods import is_method, method_class, order_methods, split_variant, variant_name
from attribution.metrics import cost_table, declared_cost_specs, variant_cost_spec
from attribution.ranking import ranking_file_name


def test_variant_names_resolve_to_their_base_class():
    assert variant_name("trak", "m20") == "trak@m20"
    assert split_variant("trak@m20") == ("trak", "m20")
    assert split_variant("esvm") == ("esvm", None)
    assert method_class("trak@same-class") is method_class("trak")
    assert is_method("datamodels@n1000") and not is_method("nope@m1")
    with pytest.raises(ValueError, match="unknown attribution method 'nope@m1'"):
        method_class("nope@m1")
    with pytest.raises(ValueError, match="variant tag"):
        variant_name("trak", "m 20")


def test_variants_follow_their_base_in_natural_order():
    names = ["trak@m20", "random", "trak", "trak@m5", "trak@m1", "esvm", "datamodels@n1000", "old-method"]
    ordered = order_methods(names)
    assert ordered.index("trak") < ordered.index("trak@m1") < ordered.index("trak@m5") < ordered.index("trak@m20")
    assert ordered.index("esvm") < ordered.index("trak")
    assert ordered[-1] == "old-method"
    assert sorted(ordered) == sorted(names)


def test_variant_files_and_cost_spec(tmp_path):
    assert ranking_file_name("trak@m20", 3) == "trak@m20-class003.parquet"
    spec = variant_cost_spec("trak@m20", declared_cost_specs())
    assert spec.stages == method_class("trak").cost.stages
    assert "scores/trak@m20" in spec.paths and "scores/trak" not in spec.paths
    # per-variant seconds replace the whole stage's
    manifest = {"trak": {"seconds": 50.0, "method_seconds": {"trak@m1": 4.0, "trak": 12.5}},
                "timing.trak": {"seconds": 51.0}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "scores" / "trak@m1").mkdir(parents=True)
    (tmp_path / "scores" / "trak@m1" / "class000.parquet").write_bytes(b"x" * 10)
    table = cost_table(tmp_path, ["trak@m1", "trak", "trak@m20"]).set_index("method")
    assert table.loc["trak@m1", "seconds"] == 4.0
    assert table.loc["trak", "seconds"] == 12.5
    assert table.loc["trak@m20", "seconds"] == 51.0  # not measured per variant: the whole stage
    assert table.loc["trak@m1", "storage_bytes"] == 10
