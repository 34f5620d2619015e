"""The command line, built from the stage registry: one subcommand per stage, every
mistake refused before any work with a message that names it (exit code 2)."""

import pytest

from attribution.stages import available_stages, stage_class
from cluster.cli import build_parser, main


def test_every_registered_stage_has_its_subcommand_with_its_flags():
    parser = build_parser()
    for name in available_stages():
        cls = stage_class(name)
        args = parser.parse_args([name, "EXPDIR"] + [f.name for f in cls.flags if f.type is None])
        assert args.stage == name and args.exp_positional == "EXPDIR"
        for flag in cls.flags:
            assert hasattr(args, "flag_" + flag.name.lstrip("-").replace("-", "_"))
    # the old spellings keep working
    assert parser.parse_args(["report", "runs/x", "--n-boot", "10"]).flag_n_boot == 10
    assert parser.parse_args(["rank", "--exp", "runs/x", "--set", "rank.top_k=3"]).overrides == ["rank.top_k=3"]


@pytest.mark.parametrize("argv, message", [
    (["run", "quickstart", "--stages", "embedd"], "unknown stage(s) ['embedd']; stages: pretrain, embed"),
    (["run", "quickstart", "--stages", "rank, suport"], "unknown stage(s) ['suport']"),
    (["run", "quickstart", "--set", "suport.targets=1"], "unknown preset section(s) or key(s) ['suport']"),
    (["run", "quickstart", "--set", "rank.top_k=abc"], "rank.top_k must be an integer >= 1, got 'abc'"),
    (["run", "quickstart", "--set", "support.seeds=-1"], "support.seeds must be"),
    (["rank", "--set", "rank.topk=3"], "unknown [rank] setting(s) ['topk']"),
    (["support", "--set", "support.modes=[\"removal\", \"flip\"]"], "support.modes"),
])
def test_mistakes_are_refused_before_any_work(argv, message, tmp_path, capsys):
    exp = tmp_path / "exp"
    code = main(argv + ["--exp", str(exp)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not exp.exists() or not any(exp.iterdir())  # nothing written


def test_a_stage_whose_input_is_missing_names_the_stage_that_writes_it(tmp_path, capsys):
    code = main(["support", str(tmp_path / "exp")])
    assert code == 2
    err = capsys.readouterr().err
    assert "the support stage needs" in err and "which the rank stage writes: run 'attribution rank --exp" in err
