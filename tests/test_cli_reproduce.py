"""``sparsesam reproduce``: the study's outputs, resuming after an interruption, skipping finished runs, bad input.

Every test runs --quick (digits at 8x8, a quarter-width SmallCNN, a few
dozen images): seconds. The real study is test_reproduce_full_study
(marked slow; about 40 minutes on a quiet CPU core).
"""
import json
import os

import pytest

from cli_helpers import Interrupted, assert_same_weights, interrupt_after_saves, read_weights, run

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")
pytest.importorskip("torch_pruning", reason="the structured baselines need torch-pruning")
pytest.importorskip("matplotlib", reason="the report's figures need matplotlib")

QUICK = ["reproduce", "--quick", "--seeds", "0", "--threads", "1", "--no-progress"]
CSAM_RUNS = ["csam-90", "magnitude-90", "sam_prune-90"]


def _run_json(out, comparison, name, seed=0):
    with open(os.path.join(str(out), f"seed{seed}", comparison, name, "run.json")) as f:
        return json.load(f)


def _headline(record):
    return {k: record[k] for k in ("clean_accuracy", "sparsity", "weight_sparsity", "smoothing", "cc_cert")
            if k in record}


@pytest.fixture(scope="module")
def csam_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert run([*QUICK, "--comparisons", "csam", "--out", out]) == 0
    return out


def test_study_writes_runs_table_figures_and_results(csam_study):
    out = csam_study
    for name in CSAM_RUNS:
        record = _run_json(out, "csam", name)
        assert record["comparison"] == "csam" and record["seed"] == 0 and record["target_sparsity"] == 0.9
        assert abs(record["weight_sparsity"] - 0.9) < 0.02
        assert record["smoothing"]["radii"] == [0.0, 0.25] and len(record["smoothing"]["certified_accuracy"]) == 2
        assert "rotation" in record["cc_cert"]["transforms"]
        assert "pgd" not in record and "corruption" not in record  # only what the comparison's paper reports
    # the SAM baseline of C-SAM is unstructured; its config went through the registry
    assert _run_json(out, "csam", "sam_prune-90")["config"]["granularity"] == "unstructured"
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["finished_runs"] == results["planned_runs"] == 3
    assert results["seeds"] == [0] and results["command"].startswith("sparsesam reproduce --quick")
    assert len(results["timing"]["run_cpu_seconds"]) == 3 and all(t > 0 for t in results["timing"]["run_cpu_seconds"])
    rows = results["comparisons"]["csam"]["rows"]
    assert [r["method"] for r in rows] == ["csam", "magnitude", "sam_prune"]
    csam = rows[0]["metrics"]
    assert csam["clean_accuracy"]["mean"] == _run_json(out, "csam", "csam-90")["clean_accuracy"]
    assert {"certified_l2@0.25", "cc_rotation@0.05", "cc_mean@0.05"} <= set(csam)
    table = open(os.path.join(out, "RESULTS.md")).read()
    assert "C-SAM vs magnitude vs plain SAM masks" in table and "seeds: 0" in table and "commit of the code that ran" in table
    for figure in results["figures"]:
        path = os.path.join(out, figure)
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"
    assert {"figures/csam_accuracy_vs_sparsity.png", "figures/csam_certified_l2.png",
            "figures/csam_cc_cert.png"} <= set(results["figures"])


def test_rerun_skips_finished_runs_and_a_redone_run_is_identical(csam_study, tmp_path, capsys):
    out = csam_study
    before = {name: os.path.getmtime(os.path.join(out, "seed0", "csam", name, "run.json")) for name in CSAM_RUNS}
    magnitude = _run_json(out, "csam", "magnitude-90")
    weights = read_weights(os.path.join(out, "seed0", "csam", "magnitude-90"))
    import shutil
    shutil.rmtree(os.path.join(out, "seed0", "csam", "magnitude-90"))  # one run lost: only it is redone
    capsys.readouterr()
    assert run([*QUICK, "--comparisons", "csam", "--out", out]) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == 2
    for name in ("csam-90", "sam_prune-90"):
        assert os.path.getmtime(os.path.join(out, "seed0", "csam", name, "run.json")) == before[name]
    # deterministic: the redone run (from the dense model read back from disk) equals the first one
    assert _headline(_run_json(out, "csam", "magnitude-90")) == _headline(magnitude)
    assert_same_weights(read_weights(os.path.join(out, "seed0", "csam", "magnitude-90")), weights)


def test_interrupted_study_resumes_to_the_same_results(csam_study, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    # Checkpoints: dense 1 epoch, then csam's two phases, then magnitude's first fine-tuning epoch: stop there.
    interrupt_after_saves(monkeypatch, 4)
    with pytest.raises(Interrupted):
        run([*QUICK, "--comparisons", "csam", "--out", out])
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(out, "seed0", "csam", "csam-90", "run.json"))
    assert not os.path.exists(os.path.join(out, "seed0", "csam", "magnitude-90", "run.json"))
    assert os.path.isfile(os.path.join(out, "seed0", "csam", "magnitude-90", "prune_checkpoint.pt"))
    assert run([*QUICK, "--comparisons", "csam", "--out", out]) == 0
    for name in CSAM_RUNS:
        assert _headline(_run_json(out, "csam", name)) == _headline(_run_json(csam_study, "csam", name)), name
        assert_same_weights(read_weights(os.path.join(out, "seed0", "csam", name)),
                            read_weights(os.path.join(csam_study, "seed0", "csam", name)))
    assert not os.path.exists(os.path.join(out, "seed0", "csam", "magnitude-90", "prune_checkpoint.pt"))


def test_structured_baselines_and_adversarial_setting_reach_the_configs(tmp_path):
    from sparsesam.algorithms import ALGORITHMS
    from sparsesam.commands.reproduce_plan import BUDGETS, COMPARISONS, method_config
    budgets = {name: values[0] for name, values in BUDGETS.items()}
    adasap, harp, csam = COMPARISONS["adasap"], COMPARISONS["harp"], COMPARISONS["csam"]
    for method in ("magnitude", "sam_prune"):
        config = method_config(adasap, method, 0.5, ALGORITHMS[method], 3, budgets)
        assert config.granularity == "channel" and config.target_sparsity == 0.5 and config.seed == 3
        assert method_config(csam, method, 0.9, ALGORITHMS[method], 0, budgets).granularity == "unstructured"
    for method in harp.methods:
        config = method_config(harp, method, 0.99, ALGORITHMS[method], 0, budgets)
        assert (config.loss, config.eps, config.attack_steps) == ("pgd_at", budgets["adv_eps"],
                                                                   budgets["attack_steps"])
    # equal passes over the data: magnitude's single phase gets both phases' epochs
    assert method_config(csam, "magnitude", 0.9, ALGORITHMS["magnitude"], 0, budgets).finetune_epochs == \
        2 * budgets["algo_epochs"]
    sam = method_config(csam, "sam_prune", 0.9, ALGORITHMS["sam_prune"], 0, budgets)
    assert sam.sam_epochs == sam.finetune_epochs == budgets["algo_epochs"]


def test_report_calls_a_difference_only_outside_the_seed_ranges():
    from sparsesam.commands.reproduce_plan import COMPARISONS
    from sparsesam.commands.reproduce_report import _stats, verdicts
    comparison = COMPARISONS["csam"]

    def row(method, values):
        return {"method": method, "target_sparsity": 0.9, "seeds": len(values),
                "metrics": {"clean_accuracy": _stats(values)}}
    rows = [row("csam", [0.80, 0.82, 0.81]), row("magnitude", [0.70, 0.72, 0.79]), row("sam_prune", [0.79, 0.85, 0.9])]
    calls = {v["baseline"]: v for v in verdicts(comparison, rows)}
    assert calls["magnitude"]["call"] == "higher"
    assert calls["magnitude"]["difference"] == pytest.approx(0.81 - (0.70 + 0.72 + 0.79) / 3)
    assert calls["sam_prune"]["call"] == "within spread"  # ranges overlap although the means differ
    rows[1] = row("magnitude", [0.70, 0.72])  # two seeds: below the project's minimum, nothing is called
    assert {v["baseline"]: v["call"] for v in verdicts(comparison, rows)}["magnitude"].startswith("not called")


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "a,b"], "expected comma-separated integers"),
    (["--seeds", "-1"], "non-negative"),
    (["--comparisons", "adasap,foo"], "unknown comparison"),
])
def test_malformed_arguments_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        run([*QUICK, "--out", tmp_path / "x", *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--algo-limit", "500", "--limit", "100"], "--algo-limit"),
    (["--sigma", "0"], "--sigma"),
    (["--severities", "7"], "--severities"),
    (["--corruptions", "rain"], "unknown corruption"),
    (["--cc-transforms", "shear"], "unknown CC-Cert transform"),
    (["--smoothing-n0", "64", "--smoothing-n", "32"], "--smoothing-n0"),
    (["--threads", "0"], "--threads"),
    (["--lr", "-1"], "--lr"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert run([*QUICK, "--out", tmp_path / "x", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsesam reproduce: error:") and message in err[0]
    assert not os.path.exists(tmp_path / "x")  # nothing made for a bad setting


def test_rerun_with_other_budgets_is_refused(csam_study, capsys):
    assert run([*QUICK, "--comparisons", "csam", "--out", csam_study, "--smoothing-n", "64"]) == 2
    assert "other budgets (smoothing_n)" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_full_study(tmp_path):
    """The real study (about 40 minutes on a quiet CPU core): every planned run finishes and is reported."""
    out = tmp_path / "study"
    assert run(["reproduce", "--out", out, "--no-progress"]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["finished_runs"] == results["planned_runs"] == 45
    for comparison in results["comparisons"].values():
        for row in comparison["rows"]:
            assert row["seeds"] == 3
            assert row["metrics"]["clean_accuracy"]["mean"] > 0.5  # every method learnt Fashion-MNIST
