"""The command line, built from the stage registry: one subcommand per stage, every
mistake refused before any work with one ``error:`` line that names it and the fix
(exit code 2), ``--debug`` for the traceback, uniform ``--exp``. The battery of bad
inputs against a real experiment is tests/test_bad_inputs.py."""

import argparse
import ast
import re
from pathlib import Path

import pytest

from attribution.stages import available_stages, stage_class
from cluster.cli import build_parser, main, one_line

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("argv, messages", [
    (["run", "quickstart", "--stages", "embedd"],
     ["unknown stage(s) ['embedd'] (did you mean 'embed'?); stages: pretrain, embed"]),
    (["run", "quickstart", "--stages", "rank, suport"], ["unknown stage(s) ['suport'] (did you mean 'support'?)"]),
    (["run", "quickstart", "--stages", ","], ["--stages is empty"]),
    (["run", "imagenet", "--stages", "datamodels"], ["--stages datamodels: the imagenet preset has no [datamodels] "
                                                     "section", "its stages are embed, rank, trak, support, report"]),
    (["run", "quickstart", "--set", "suport.targets=1"],
     ["unknown preset section(s) or key(s) ['suport'] (did you mean 'support'?)"]),
    (["run", "quickstart", "--set", "top_k=3"], ["['top_k'] (did you mean 'rank.top_k' or"]),
    (["run", "quickstart", "--set", "rank.top_k=abc"], ["rank.top_k must be an integer >= 1, got 'abc'"]),
    (["run", "quickstart", "--set", "support.seeds=-1"], ["support.seeds must be >= 1, got -1"]),
    (["run", "quickstart", "--set", "embed.dtype=float61"], ["embed.dtype must be one of", "got 'float61'",
                                                             "(did you mean 'float16'?)"]),
    (["run", "quickstart", "--set", "rank.top_k"], ["--set 'rank.top_k' must look like SECTION.KEY=VALUE"]),
    (["run", "quickstart", "--set", "rank.methods.esvm=1"], ["cannot set rank.methods.esvm", "not a table"]),
    (["run", "quickstrat"], ["preset 'quickstrat' not found", "(did you mean 'quickstart'?)"]),
    (["run", "quickstart", "--ablation", "all-clas"], ["unknown ablation 'all-clas' (did you mean 'all-class'?)"]),
    (["submit", "quickstart", "--address", "http://127.0.0.1:1", "--stages", "suport"], ["did you mean 'support'"]),
    (["rank", "--set", "rank.topk=3"], ["unknown [rank] setting(s) ['topk'] (did you mean 'top_k'?)"]),
    (["support", "--set", "support.modes=[\"removal\", \"flip\"]"], ["support.modes"]),
])
def test_mistakes_are_refused_before_any_work(argv, messages, tmp_path, capsys):
    exp = tmp_path / "exp"
    code = main(argv + ["--exp", str(exp)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    for message in messages:
        assert message in err
    assert not exp.exists()  # nothing written, not even the folder


@pytest.mark.parametrize("argv, messages", [
    (["run"], ["the following arguments are required: preset", "see 'attribution run --help'"]),
    (["rank", "EXP", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["suport", "EXP"], ["invalid choice: 'suport'", "(did you mean 'support'?)", "see 'attribution --help'"]),
    (["pretrain", "EXP", "--threads", "abc"], ["argument --threads: invalid int value: 'abc'"]),
    (["job", "stat", "ID", "--address", "http://127.0.0.1:1"], ["(did you mean 'status'?)"]),
    (["job", "status", "--address", "http://127.0.0.1:1"], ["required: JOB_ID"]),
    (["job", "status", "raysubmit_1"], ["needs the cluster's dashboard address: --address http://HEAD:8265"]),
])
def test_usage_errors_are_one_line_with_exit_code_2(argv, messages, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "usage:" not in err and "Traceback" not in err
    for message in messages:
        assert message in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback(where, tmp_path, capsys):
    argv = ["run", "quickstart", "--set", "rank.top_k=abc", "--exp", str(tmp_path / "exp")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "SettingsError" in err
    assert err.splitlines()[-1] == "error: rank.top_k must be an integer >= 1, got 'abc'"


def test_only_the_projects_user_errors_become_one_line():
    """What the user can fix is one line; a bug (KeyError, TypeError, ...) keeps Python's
    traceback, which its report needs."""
    from attribution.artifacts import SettingsChanged
    from attribution.backbones import CheckpointError
    from attribution.data import DatasetNotFoundError
    from attribution.experiment import ExperimentLocked
    from attribution.settings import SettingsError
    from attribution.stages import StageInputMissing
    from attribution.workqueue import WorkFailed
    from cluster.cli import user_errors
    from cluster.submit import SubmissionError

    errors = user_errors()
    for cls in (SettingsError, SettingsChanged, StageInputMissing, DatasetNotFoundError, CheckpointError,
                ExperimentLocked, WorkFailed, SubmissionError):
        assert issubclass(cls, errors), cls
    for cls in (KeyError, TypeError, AttributeError, IndexError, AssertionError, RuntimeError):
        assert not issubclass(cls, errors), cls


def test_one_line_drops_a_quoted_worker_traceback():
    error = RuntimeError("rank class 3 failed 3 times; last error: ValueError: bad\n"
                         "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad")
    assert one_line(error) == "rank class 3 failed 3 times; last error: ValueError: bad"
    assert one_line(ValueError("first\n  second")) == "first second"


def test_job_commands_take_their_flags_in_any_order():
    parser = build_parser()
    for argv in (["job", "logs", "--follow", "ID", "--address", "A"],
                 ["job", "logs", "ID", "--follow", "--address", "A"],
                 ["job", "--address", "A", "logs", "--follow", "ID"]):
        args = parser.parse_args(argv)
        assert (args.action, args.job_id, args.follow, args.address) == ("logs", "ID", True, "A"), argv
    args = parser.parse_args(["job", "list", "--address", "A"])
    assert (args.action, args.address) == ("list", "A")
    args = parser.parse_args(["job", "stop", "ID", "--address", "A"])
    assert (args.action, args.job_id) == ("stop", "ID")


def test_an_unknown_job_id_names_the_command_that_lists_the_jobs():
    from cluster.commands.submit import lookup_error
    from cluster.submit import SubmissionError

    # what Ray's JobSubmissionClient raises for an id it does not know
    ray_error = RuntimeError("Request failed with status code 404: Job raysubmit_nope does not exist.")
    error = lookup_error(ray_error, "raysubmit_nope", "http://head:8265")
    assert isinstance(error, SubmissionError)
    assert str(error) == ("no job 'raysubmit_nope' on the cluster at http://head:8265: list the submitted jobs "
                          "with 'attribution job list --address http://head:8265'")
    other = lookup_error(RuntimeError("Request failed with status code 500: boom\ndetails"), "j", "http://h:1")
    assert str(other) == ("the Ray cluster at http://h:1 could not answer about job 'j': "
                          "Request failed with status code 500: boom")


def test_compare_takes_exp_flags_too_and_a_missing_experiment_creates_nothing(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(["compare", "a", "b", "--exp", "c", "--exp", "d"])
    assert args.exps == ["a", "b"] and args.exp == ["c", "d"]
    out = tmp_path / "comparison"
    assert main(["compare", "--exp", str(tmp_path / "typo"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"experiment {tmp_path / 'typo'} does not exist" in err and "check the path" in err
    assert sorted(tmp_path.iterdir()) == []  # neither the experiment nor the output folder
    assert main(["compare", "--out", str(out)]) == 2
    assert "give the experiments to compare" in capsys.readouterr().err


def test_report_of_a_missing_experiment_names_it_and_creates_nothing(tmp_path, capsys):
    for argv in (["report", str(tmp_path / "typo")], ["report", "--exp", str(tmp_path / "typo")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "typo") in err and "attribution run PRESET --exp" in err
        assert not (tmp_path / "typo").exists()


def test_a_stage_whose_input_is_missing_names_the_stage_that_writes_it(tmp_path, capsys):
    code = main(["support", str(tmp_path / "exp")])
    assert code == 2
    err = capsys.readouterr().err
    assert "the support stage needs" in err and "which the rank stage writes: run 'attribution rank --exp" in err
    assert not (tmp_path / "exp").exists()


def test_two_different_experiments_are_refused(tmp_path, capsys):
    assert main(["rank", str(tmp_path / "a"), "--exp", str(tmp_path / "b")]) == 2
    assert "two experiments given" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def _parser_flags(parser, found=None) -> set[str]:
    found = set() if found is None else found
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _parser_flags(sub, found)
    return found


# flags of other programs that messages name (apt-get install --reinstall, ray start --head)
OTHER_PROGRAMS_FLAGS = {"--reinstall", "--head"}


def test_every_flag_a_message_names_exists():
    """Hints must name real flags (they once said --data-root, which never existed)."""
    known = _parser_flags(build_parser()) | OTHER_PROGRAMS_FLAGS
    unknown = {}
    for path in sorted([*ROOT.glob("attribution/**/*.py"), *ROOT.glob("cluster/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    if flag not in known:
                        unknown.setdefault(flag, set()).add(str(path.relative_to(ROOT)))
    assert not unknown, f"messages name flags the attribution command does not have: {unknown}"
    assert "--set" in known and "--exp" in known and "--data-root" not in known  # the scan sees the parser


def test_a_failed_block_still_pushes_what_finished(tmp_path):
    """Stage commands and runs push in pushed(): a stage that fails after finishing some
    units leaves them at the URI, not only in this machine's staging folder."""
    from cluster.pipeline import pushed
    from cluster.storage import ExperimentStorage

    store = tmp_path / "store"
    storage = ExperimentStorage(f"file://{store}", staging_root=tmp_path / "staging", create=False)
    storage.pull()
    with pytest.raises(ValueError, match="the stage failed"):
        with pushed(storage):
            (storage.local / "trainings").mkdir(parents=True)
            (storage.local / "trainings" / "part-1.parquet").write_bytes(b"finished work")
            raise ValueError("the stage failed")
    assert (store / "trainings" / "part-1.parquet").read_bytes() == b"finished work"
    with pushed(storage):  # and on success, as before
        (storage.local / "manifest.json").write_text("{}")
    assert (store / "manifest.json").read_text() == "{}"
