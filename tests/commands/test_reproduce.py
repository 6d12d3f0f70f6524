"""``sparsesam reproduce``: the study's outputs, resuming after an interruption, skipping finished runs, bad input.

Every test runs --quick (digits at 8x8, a quarter-width SmallCNN, a few
dozen images): seconds. The real study is test_reproduce_full_study
(marked slow; hours: docs/reproduce/README.md).
"""
import json
import os

import pytest

from cli_helpers import Interrupted, assert_same_weights, interrupt_after_saves, read_weights, run

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")
pytest.importorskip("torch_pruning", reason="the structured baselines need torch-pruning")
pytest.importorskip("matplotlib", reason="the report's figures need matplotlib")

QUICK = ["reproduce", "--quick", "--seeds", "0", "--threads", "1", "--no-progress"]
CSAM_RUNS = ["csam-90", "csam_rho0-90", "magnitude-90", "sam_prune-90"]


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
    # the ablation: the same algorithm with the mask perturbation switched off
    assert _run_json(out, "csam", "csam_rho0-90")["config"]["rho"] == 0.0
    assert _run_json(out, "csam", "csam-90")["config"]["rho"] > 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["finished_runs"] == results["planned_runs"] == 4
    assert results["seeds"] == [0] and results["command"].startswith("sparsesam reproduce --quick")
    assert len(results["timing"]["run_cpu_seconds"]) == 4 and all(t > 0 for t in results["timing"]["run_cpu_seconds"])
    # the csam comparison starts from a noise-trained dense model, trained until its plateau rule stopped it
    dense = json.load(open(os.path.join(out, "seed0", "dense-noise", "train.json")))
    assert dense["kind"] == "noise" and dense["epochs"] == len(dense["history"]) >= 2
    assert results["timing"]["dense"]["noise"]["epochs"] == [dense["epochs"]]
    record = _run_json(out, "csam", "csam-90")
    assert record["start"] == "noise" and record["train_noise"] and record["dense_epochs"] == dense["epochs"]
    assert set(record["phase_seconds"]) == {"mask", "finetune"} and record["commit"] is not None
    rows = results["comparisons"]["csam"]["rows"]
    assert [r["method"] for r in rows] == ["csam", "csam_rho0", "magnitude", "sam_prune"]
    csam = rows[0]["metrics"]
    assert csam["clean_accuracy"]["mean"] == _run_json(out, "csam", "csam-90")["clean_accuracy"]
    assert {"certified_l2@0.25", "cc_rotation@0.05", "cc_mean@0.05"} <= set(csam)
    table = open(os.path.join(out, "RESULTS.md")).read()
    assert "C-SAM vs magnitude vs plain SAM masks" in table and "seeds: 0" in table and "commits of the code that ran" in table
    cpu_hours = sum(results["timing"]["run_cpu_seconds"]) / 3600
    assert f"the runs' CPU time: {cpu_hours:.2f} CPU-hours over 4 runs" in table
    assert "no radius above" in table  # the smoothing cap, sigma * Phi^-1(alpha^(1/N))
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
    assert err.count("done before, skipped") == 4  # the dense model and three runs
    for name in ("csam-90", "csam_rho0-90", "sam_prune-90"):
        assert os.path.getmtime(os.path.join(out, "seed0", "csam", name, "run.json")) == before[name]
    # deterministic: the redone run (from the dense model read back from disk) equals the first one
    assert _headline(_run_json(out, "csam", "magnitude-90")) == _headline(magnitude)
    assert_same_weights(read_weights(os.path.join(out, "seed0", "csam", "magnitude-90")), weights)


def test_interrupted_study_resumes_to_the_same_results(csam_study, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    # Checkpoints: dense 2 epochs, csam's two phases, csam_rho0's two, then magnitude's first fine-tuning epoch.
    interrupt_after_saves(monkeypatch, 7)
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


def test_dense_training_interrupted_after_its_second_epoch_resumes(csam_study, tmp_path, monkeypatch):
    """The dense model's checkpoint is at epoch 2 when the study stops; the rerun continues from it (it once
    restarted the plateau loop at epoch 1 and refused its own checkpoint as "at epoch 2; this run has 1")."""
    out = tmp_path / "dense-interrupted"
    interrupt_after_saves(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run([*QUICK, "--comparisons", "csam", "--out", out])
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(out, "seed0", "dense-noise", "checkpoint.pt"))
    assert run([*QUICK, "--comparisons", "csam", "--out", out]) == 0
    assert_same_weights(read_weights(os.path.join(out, "seed0", "dense-noise")),
                        read_weights(os.path.join(csam_study, "seed0", "dense-noise")))
    for name in CSAM_RUNS:
        assert _headline(_run_json(out, "csam", name)) == _headline(_run_json(csam_study, "csam", name)), name


def test_structured_baselines_and_adversarial_setting_reach_the_configs(tmp_path):
    from sparsesam.algorithms import ALGORITHMS
    from sparsesam.study.plan import BUDGETS, COMPARISONS, harp_gamma, method_config
    budgets = {name: values[0] for name, values in BUDGETS.items()}
    adasap, harp, csam = COMPARISONS["adasap"], COMPARISONS["harp"], COMPARISONS["csam"]

    def config(comparison, label, sparsity, seed=0):
        method = comparison.method(label)
        return method_config(comparison, method, sparsity, ALGORITHMS[method.algorithm], seed, budgets)
    magnitude = config(adasap, "magnitude", 0.5, seed=3)
    assert magnitude.granularity == "channel" and magnitude.target_sparsity == 0.5 and magnitude.seed == 3
    assert config(csam, "magnitude", 0.9).granularity == "unstructured"
    assert config(csam, "sam_prune", 0.9).granularity == "unstructured"
    for method in harp.labels:
        c = config(harp, method, 0.99)
        assert (c.loss, c.eps, c.attack_steps) == ("pgd_at", budgets["adv_eps"], budgets["attack_steps"])
    # HARP's gamma0: the official schedule's summed weight (0.01 * 391 steps * (1 + ... + 20)) over this search
    steps = -(-budgets["algo_limit"] // budgets["batch_size"])
    e = budgets["algo_epochs"]
    assert config(harp, "harp", 0.9).gamma == pytest.approx(harp_gamma(budgets)) == \
        pytest.approx(0.01 * 391 * 210 / (steps * e * (e + 1) / 2))
    # equal passes over the data: magnitude's single phase gets both phases' epochs
    assert config(csam, "magnitude", 0.9).finetune_epochs == 2 * budgets["algo_epochs"]
    sam = config(csam, "sam_prune", 0.9)
    assert sam.sam_epochs == sam.finetune_epochs == budgets["algo_epochs"]
    assert config(csam, "csam_rho0", 0.9).rho == 0.0 and config(csam, "csam", 0.9).rho > 0


def test_report_pairs_seeds_and_calls_with_holm_adjusted_paired_tests():
    from scipy import stats
    from sparsesam.study.plan import COMPARISONS
    from sparsesam.study.report import holm, paired, seed_stats, verdicts
    comparison = COMPARISONS["csam"]

    def row(method, values, seeds=(0, 1, 2, 3, 4)):
        return {"method": method, "target_sparsity": 0.9, "seeds": len(values),
                "metrics": {"clean_accuracy": seed_stats(list(values), list(seeds))}}
    ours = [0.80, 0.82, 0.81, 0.79, 0.83]
    # magnitude: always 3-5 points lower (paired: called, although the ranges overlap with ours)
    magnitude = [0.77, 0.78, 0.77, 0.75, 0.80]
    rows = [row("csam", ours), row("csam_rho0", [0.81, 0.80, 0.82, 0.78, 0.84]), row("magnitude", magnitude),
            row("sam_prune", [0.70, 0.90, 0.75, 0.85, 0.80])]
    found = {v["baseline"]: v for v in verdicts(comparison, rows)}
    assert found["csam_rho0"]["role"] == "ablation" and found["magnitude"]["role"] == "baseline"
    m = found["magnitude"]
    assert m["mean"] == pytest.approx(sum(a - b for a, b in zip(ours, magnitude)) / 5)
    assert m["p"] == pytest.approx(stats.ttest_rel(ours, magnitude).pvalue) and m["wins"] == 5
    assert m["p_holm"] == pytest.approx(min(1.0, 3 * m["p"]))  # the smallest of three p-values: times 3
    assert m["call"] == "higher" and m["ci95"][0] > 0
    assert found["sam_prune"]["call"] == "no significant difference"  # noisy: means differ, the test says no
    assert holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    # a metric equal on every seed (certified accuracy at an unreachable radius) is no test and not in the family
    for r in rows:
        r["metrics"]["certified_l2@1"] = seed_stats([0.0] * 5, [0, 1, 2, 3, 4])
    found = verdicts(comparison, rows)
    zero = [v for v in found if v["metric"] == "certified_l2@1"]
    assert len(zero) == 3 and all(v["p"] is None and v["call"] == "equal on every seed (no test)" for v in zero)
    assert {v["baseline"]: v for v in found if v["metric"] == "clean_accuracy"}["magnitude"]["p_holm"] == \
        pytest.approx(min(1.0, 3 * m["p"]))  # still three tests, not six
    # the same nonzero difference on every seed, up to float rounding: no t-test on the rounding, a sign test
    theirs = [0.1, 0.7, 0.2, 0.33, 0.9]
    ours_plus = [v + 0.03 for v in theirs]  # differences 0.03, 0.030000000000000027, 0.02999999999999997, ...
    same = paired(seed_stats(ours_plus, list(range(5))), seed_stats(theirs, list(range(5))))
    assert same["std"] > 0  # the rounding: a t-test would give p ~ 1e-15
    assert same["wins"] == 5 and not same["identical"]
    assert same["p"] == pytest.approx(stats.binomtest(5, 5).pvalue) == pytest.approx(2 * 0.5 ** 5)
    # seeds are paired by number: a seed one method lacks is left out of the pair
    rows[2] = row("magnitude", magnitude[:2], seeds=(0, 1))
    assert {v["baseline"]: v for v in verdicts(comparison, rows)}["magnitude"]["call"].startswith("not called")


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
    (["--sigma", "nan"], "--sigma"),
    (["--workers", "0"], "--workers"),
    (["--limit", "1400", "--val-limit", "400"], "--val-limit"),
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
    """The real study (about 6 CPU-hours: docs/reproduce/README.md, Cost): every planned run finishes and is reported."""
    out = tmp_path / "study"
    assert run(["reproduce", "--out", out, "--no-progress"]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["finished_runs"] == results["planned_runs"] == 80
    for comparison in results["comparisons"].values():
        for row in comparison["rows"]:
            assert row["seeds"] == 5
            assert row["metrics"]["clean_accuracy"]["mean"] > 0.5  # every method learnt Fashion-MNIST


def test_plateau_rule_stops_after_patience_epochs_without_a_gain():
    from sparsesam.study.dense import plateaued
    assert not plateaued([0.5, 0.6], patience=2, min_delta=0.01)  # too few epochs to judge
    assert not plateaued([0.5, 0.6, 0.7, 0.71], patience=2, min_delta=0.005)  # 0.71 gains 0.11 on 0.60
    assert plateaued([0.5, 0.7, 0.705, 0.69], patience=2, min_delta=0.01)  # best before 0.70, since +0.005 at most
    assert not plateaued([0.5, 0.7, 0.705, 0.72], patience=2, min_delta=0.01)


def test_gaussian_noise_collate_adds_cohen_noise_reproducibly():
    import torch
    from sparsesam.data.noise import GaussianNoiseCollate
    batch = [(torch.full((1, 4, 4), 0.5), 3) for _ in range(256)]
    torch.manual_seed(0)
    x, y = GaussianNoiseCollate(0.25)(batch)
    torch.manual_seed(0)
    expected = torch.full((256, 1, 4, 4), 0.5) + torch.randn(256, 1, 4, 4) * 0.25
    assert torch.equal(x, expected) and y.tolist() == [3] * 256
    assert abs(float((x - 0.5).std()) - 0.25) < 0.01
    for bad in (0, -1.0, float("nan"), float("inf"), "0.25", True):
        with pytest.raises(ValueError, match="sigma"):
            GaussianNoiseCollate(bad)


def test_parallel_workers_match_one_worker_and_die_with_the_study(csam_study, tmp_path):
    """--workers 2 computes what one worker does; workers of a killed study do not live on."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "parallel"
    assert run([*QUICK, "--comparisons", "csam", "--workers", "2", "--out", out]) == 0
    for name in CSAM_RUNS:
        parallel, serial = _run_json(out, "csam", name), _run_json(csam_study, "csam", name)
        # The certified results are equal; CC-Cert's mean bounds (about 1e-13 here) may differ in the 7th digit
        # (another process: another float summation order somewhere in the worker's libraries).
        for record in (parallel, serial):
            for t in record["cc_cert"]["transforms"].values():
                t["mean_bound"] = pytest.approx(t["mean_bound"], rel=1e-5)
        assert _headline(parallel) == _headline(serial), name
    # A study killed with SIGKILL while its workers train: they notice within seconds and exit.
    killed = tmp_path / "killed"
    study = subprocess.Popen([sys.executable, "-m", "sparsesam.cli", *QUICK, "--comparisons", "csam,harp",
                              "--seeds", "0,1", "--workers", "2", "--out", str(killed)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / "seed0").exists() and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(study.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert workers, "the study started no worker process"
    study.send_signal(signal.SIGKILL)
    study.wait()
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
              for pid in workers) and time.time() < deadline:
        time.sleep(0.5)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")
             and open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    assert not alive, f"workers {alive} outlived the killed study"
