"""--execution on prune / eval / report / demo / reproduce, and prune --help."""
from __future__ import annotations

import json

import pytest

from sparsesam.algorithms import ALGORITHMS
from sparsesam.cli import build_parser

from cli_helpers import DATA, run, train_argv

QUIET_EVAL = ["--no-progress", "--no-corruptions", "--no-pgd", "--no-smoothing", "--no-cc-cert",
              "--latency-batch", "4", "--latency-repeats", "1"]


def read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("exec")
    assert run(train_argv(root / "dense", 1)) == 0
    out = root / "magnitude"
    assert run(["prune", "--algorithm", "magnitude", "--sparsity", "0.9", "--from", root / "dense", *DATA,
                "--set", "finetune_epochs=1", "--set", "execution=dense", "--execution", "sparse", "--out", out]) == 0
    return out


def test_prune_execution_overrides_the_config_field(pruned):
    prune = read(pruned / "prune.json")
    assert prune["config"]["execution"] == "sparse" and prune["execution"] == "sparse"
    assert prune["summary"]["execution"]["finetune"] and all(
        form != "dense" for form in prune["summary"]["execution"]["finetune"].values())
    assert all(form != "dense" for form in prune["layer_forms"].values())  # the final test evaluation too
    assert read(pruned / "config.json")["execution"] == "sparse"


def test_eval_runs_sparse_and_times_both_forms(pruned, tmp_path):
    out = tmp_path / "ev"
    assert run(["eval", pruned, "--out", out, "--limit", "32", "--execution", "csr", *QUIET_EVAL]) == 0
    ev = read(out / "eval.json")
    assert ev["execution"] == "csr" and set(ev["layer_forms"].values()) == {"csr"}
    assert ev["latency"]["median_ms"] > 0 and ev["latency_dense"]["median_ms"] > 0
    # Dense evaluation: the same accuracy (the forms compute the same function).
    dense_out = tmp_path / "ev_dense"
    assert run(["eval", pruned, "--out", dense_out, "--limit", "32", "--execution", "dense", *QUIET_EVAL]) == 0
    dense = read(dense_out / "eval.json")
    assert set(dense["layer_forms"].values()) == {"dense"}
    assert dense["clean_accuracy"] == ev["clean_accuracy"]


def test_eval_defaults_to_auto(pruned, tmp_path):
    out = tmp_path / "ev"
    assert run(["eval", pruned, "--out", out, "--limit", "32", *QUIET_EVAL]) == 0
    ev = read(out / "eval.json")
    assert ev["execution"] == "auto" and set(ev["layer_forms"].values()) <= {"dense", "csr", "bsr", "nm"}


def test_report_retimes_in_the_asked_form(pruned, tmp_path):
    assert run(["eval", pruned, "--limit", "32", "--execution", "dense", *QUIET_EVAL]) == 0
    out = tmp_path / "report"
    assert run(["report", pruned, "--out", out, "--execution", "sparse", "--latency-batch", "4",
                "--latency-repeats", "1"]) == 0
    (row,) = read(out / "report.json")["runs"]
    assert row["runs_as"] and "csr" in row["runs_as"] and row["dense_latency_ms"] > 0
    markdown = (out / "report.md").read_text()
    assert "runs as" in markdown and "dense latency ms" in markdown


@pytest.mark.parametrize("argv", [
    ["prune", "--algorithm", "magnitude", *DATA, "--out", "{tmp}/x"],
    ["eval", "{tmp}", "--no-progress"],
    ["report", "{tmp}", "--out", "{tmp}/r"],
    ["demo", "--out", "{tmp}/d", "--dataset", "digits"],
    ["reproduce", "--quick", "--out", "{tmp}/q", "--no-progress"],
], ids=lambda argv: argv[0])
def test_bad_execution_exits_2_with_one_line(tmp_path, capsys, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--execution", "fast"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sparsesam {argv[0]}: error: --execution must be one of")
    assert "'fast'" in err and "auto" in err and "csr" in err


def _help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_prune_help_lists_every_algorithm_and_what_sparsity_counts():
    text = _help("prune")
    listed = text.split("algorithms:")[1].split("options:")[0]
    for name in ALGORITHMS:
        line = next((l for l in listed.splitlines() if l.strip().startswith(name + " ")), None)
        assert line is not None and len(line.split()) > 3, f"{name} has no line in prune --help"
    options = text.split("options:")[1]
    sparsity = " ".join(options.split("--sparsity SPARSITY")[1].split("--set KEY=VALUE")[0].split())
    assert "WEIGHTS" in sparsity and "OUTPUT CHANNELS" in sparsity and "adasap" in sparsity
    for command in ("prune", "eval", "report", "demo", "reproduce"):
        assert "--execution" in _help(command), command
