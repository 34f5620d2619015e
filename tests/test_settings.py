"""The settings layer: typed sections, validated once, with messages naming the key."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

from attribution.artifacts import SettingsChanged, check_settings, differences, reuse, write_table
from attribution.presets import parse_override
from attribution.settings import DataSettings, Section, Settings, SettingsError, setting


@dataclass
class ToySettings(Section):
    section: ClassVar[str] = "toy"
    top_k: int = setting(10, low=1)
    solver: str = setting("batched", choices=("batched", "sklearn"))
    alpha: float = setting(0.5, low=0.0, high=1.0, low_open=True, high_open=True)
    targets: int | tuple[int, ...] = setting(5, low=1)
    methods: tuple[str, ...] = setting(("esvm",), choices=("esvm", "l2"))
    seed: int | None = None
    actors: int | None = setting(None, low=0)


def test_values_are_typed_and_defaults_filled():
    toy = ToySettings.from_preset({"seed": 7, "toy": {"top_k": 3, "targets": [4, 2], "methods": "l2"}})
    assert (toy.top_k, toy.targets, toy.methods, toy.seed, toy.alpha) == (3, (4, 2), ("l2",), 7, 0.5)
    assert ToySettings.from_preset({"toy": {"alpha": 0.25}}).alpha == 0.25
    assert isinstance(ToySettings.from_preset({"toy": {"alpha": 1 / 4}}).alpha, float)
    assert toy.to_dict()["targets"] == [4, 2]


@pytest.mark.parametrize("values, message", [
    ({"top_k": "abc"}, "toy.top_k must be an integer >= 1, got 'abc'"),
    ({"top_k": 0}, "toy.top_k must be >= 1, got 0"),
    ({"top_k": True}, "toy.top_k must be an integer"),
    ({"solver": "svm"}, r"toy.solver must be one of \['batched', 'sklearn'\], got 'svm'"),
    ({"alpha": 1.0}, r"toy.alpha must be in \(0.0, 1.0\), got 1.0"),
    ({"methods": ["esvm", "knn"]}, r"toy.methods\[1\] must be one of \['esvm', 'l2'\], got 'knn'"),
    ({"targets": -1}, "toy.targets must be an integer or a list"),
    ({"topk": 3}, r"unknown \[toy\] setting\(s\) \['topk'\] \(did you mean 'top_k'\?\); known: \["),
])
def test_bad_values_name_the_key_and_the_allowed_values(values, message):
    with pytest.raises(SettingsError, match=message):
        ToySettings.from_preset({"toy": values})


def test_the_whole_preset_is_checked_before_any_stage():
    from attribution.presets import with_overrides

    preset = with_overrides({"name": "x", "toy": {}}, dict([parse_override("suport.targets=1")]))  # a typo
    with pytest.raises(SettingsError, match=r"unknown preset section\(s\) or key\(s\) \['suport'\]"):
        Settings(preset, {"toy": ToySettings})
    with pytest.raises(SettingsError, match="toy.top_k must be an integer"):
        Settings({"name": "x", "toy": {"top_k": "abc"}}, {"toy": ToySettings})
    settings = Settings({"name": "x", "seed": 3, "data": {"train_per_class": 50}}, {"toy": ToySettings})
    assert settings.data.train_per_class == 50 and settings.data.seed == 3
    assert settings["toy"].top_k == 10 and "toy" not in settings  # absent: defaults, and not a stage to run
    with pytest.raises(SettingsError, match="data.dataset must be one of"):
        DataSettings.from_preset({"data": {"dataset": "mnist"}})


def test_one_differences_format_and_the_resume_check(tmp_path):
    import pyarrow as pa

    assert differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4}) == \
        ["b.c: 2 -> 3", "d: '(unset)' -> 4"]
    assert differences({"t": [1, 2]}, {"t": (1, 2)}) == []
    with pytest.raises(SettingsChanged, match=r"x was made with other settings \(top_k: 500 -> 100\)\. use a new"):
        check_settings("x", {"top_k": 500}, {"top_k": 100}, "use a new --exp")
    path = tmp_path / "a.parquet"
    assert reuse(path, {"k": 1}, "fix") is False  # missing: compute
    write_table(pa.table({"v": [1]}), path, settings={"k": 1})
    assert reuse(path, {"k": 1}, "fix") is True  # same settings: skip
    with pytest.raises(SettingsChanged, match="k: 1 -> 2"):
        reuse(path, {"k": 2}, "fix")
    assert reuse(path, {"k": 2}, "fix", force=True) is False  # forced: recompute
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
