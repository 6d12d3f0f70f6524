"""bench/sparse_report.py: grouping of pytest-benchmark results, ratios, targets and plots
(on synthetic results; no timing)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import sparse_report  # noqa: E402
from sparse_report import Target  # noqa: E402


def _bench(test, group, impl, median, minimum, **extra):
    params = {"impl": impl, **{k: v for k, v in extra.items() if k in ("sparsity", "batch")}}
    return {"name": f"{test}[{impl}]", "group": group, "params": params, "extra_info": extra,
            "stats": {"median": median, "min": minimum}}


def _results():
    return {"benchmarks": [
        _bench("test_lin", "lin s=0.9", "dense_masked", 1.0, 0.8, kernel="lin", sparsity=0.9),
        _bench("test_lin", "lin s=0.9", "sparsesam", 0.25, 0.1, kernel="lin", sparsity=0.9),
        _bench("test_lin", "lin s=0.99", "dense_masked", 1.0, 0.9, kernel="lin", sparsity=0.99),
        _bench("test_lin", "lin s=0.99", "sparsesam", 0.05, 0.05, kernel="lin", sparsity=0.99),
        # No "kernel" in extra_info: found by the test's name, as a new bench file's would be.
        _bench("test_bsr", "bsr s=0.9", "dense_masked", 2.0, 2.0, sparsity=0.9),
        _bench("test_bsr", "bsr s=0.9", "bsr", 1.0, 0.5, sparsity=0.9),
        _bench("test_bsr", "bsr s=0.99", "dense_masked", 2.0, 2.0, sparsity=0.99),
        _bench("test_bsr", "bsr s=0.99", "bsr", 0.1, 0.1, sparsity=0.99),
        _bench("test_inf", "inf b=1", "dense", 3.0, 3.0, kernel="inf", batch=1),
        _bench("test_inf", "inf b=1", "compact", 2.0, 1.0, kernel="inf", batch=1),
        # Not a sparse-execution benchmark: ignored.
        {"name": "test_sam_step[loop]", "group": "sam", "params": {"impl": "loop"}, "extra_info": {},
         "stats": {"median": 1.0, "min": 1.0}},
    ]}


def test_by_kernel_groups_cases_and_finds_unlabelled_kernels():
    kernels = sparse_report.by_kernel(_results())
    assert set(kernels) == {"lin", "bsr", "inf"}
    assert list(kernels["lin"]) == ["lin s=0.9", "lin s=0.99"]
    assert set(kernels["bsr"]["bsr s=0.9"]) == {"dense_masked", "bsr"}


def test_ratios_and_targets():
    kernels = sparse_report.by_kernel(_results())
    assert sparse_report.ratios(kernels["lin"]["lin s=0.9"], "sparsesam", "dense_masked") == pytest.approx((4.0, 8.0))
    met = sparse_report.evaluate(Target("lin", {"sparsity": 0.99}, "sparsesam", 20.0, "x"), kernels)
    assert met["status"] == "met" and met["median"] == pytest.approx(20.0)
    missed = sparse_report.evaluate(Target("inf", {"batch": 1}, "compact", 3.0, "x", baseline="dense"), kernels)
    assert missed["status"] == "missed" and missed["min"] == pytest.approx(3.0)
    absent = sparse_report.evaluate(Target("lin", {"sparsity": 0.5}, "sparsesam", 2.0, "x"), kernels)
    assert absent["status"] == "not run"
    table = sparse_report.targets_table(kernels, [Target("inf", {"batch": 1}, "compact", 3.0, "claim", baseline="dense",
                                                         why_if_missed="overhead")])
    assert "| claim | dense | 3x | 1.50x | 3.00x | missed |" in table and "Why: overhead." in table


def test_speedup_series_and_plots(tmp_path):
    kernels = sparse_report.by_kernel(_results())
    assert sparse_report.speedup_series(kernels["bsr"]) == {"bsr": {0.9: 2.0, 0.99: 20.0}}
    written = sparse_report.plot_kernels(kernels, str(tmp_path), targets=[])
    assert set(written) == {"lin", "bsr"}  # "inf" has no sparsity axis: no plot
    for path in written.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_speedup_series_keeps_cases_of_other_parameters_apart():
    results = {"benchmarks": [
        _bench("test_b", f"b {blk} s={s}", impl, t, t, sparsity=s) for blk, speed in (("16x16", 10.0), ("4x4", 4.0))
        for s in (0.9, 0.99) for impl, t in (("dense_masked", 1.0), ("bsr", 1.0 / speed))]}
    for b in results["benchmarks"]:
        b["params"]["block"] = [int(v) for v in b["group"].split()[1].split("x")]
    series = sparse_report.speedup_series(sparse_report.by_kernel(results)["b"])
    assert series == {"bsr block=16x16": {0.9: 10.0, 0.99: 10.0}, "bsr block=4x4": {0.9: 4.0, 0.99: 4.0}}


def test_kernel_table_puts_the_baseline_first():
    kernels = sparse_report.by_kernel(_results())
    rows = sparse_report.kernel_table(kernels["inf"]).splitlines()
    assert rows[2].startswith("| inf b=1 | dense |") and "baseline" in rows[2]
    assert rows[3].startswith("| inf b=1 | compact |") and "1.50x | 3.00x" in rows[3]
