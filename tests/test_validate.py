"""One validation layer for numeric settings (sparsesam._validate): CLI flags, --set fields, algorithm
configs and optimizer arguments refuse NaN, inf and out-of-range numbers with an error naming them."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing

import pytest
import torch

from sparsesam import _validate
from sparsesam._validate import FRACTION, NON_NEGATIVE, POSITIVE, Range
from sparsesam.algorithms import ALGORITHMS
from sparsesam.cli import build_parser
from sparsesam.commands.common import ConfigError, NumberFlag, finite_float_list, float_list
from sparsesam.commands.evaluate import check_eval_arguments
from sparsesam.algorithms.registry import build_config, config_class
from sparsesam.training import check_optimizer_arguments
from sparsesam.optim import SAM
from sparsesam.optim.fused_sgd import FusedMaskedSGD

from cli_helpers import run

NON_FINITE = [math.nan, math.inf, -math.inf]


# --- the checks themselves ----------------------------------------------------------------------------


@pytest.mark.parametrize("allowed, good, bad", [
    (_validate.FINITE, [-1e300, 0, 3], NON_FINITE),
    (NON_NEGATIVE, [0, 0.0, 1e6], [-1e-12, *NON_FINITE]),
    (POSITIVE, [1e-30, 2], [0, -1, *NON_FINITE]),
    (FRACTION, [0, 0.5, 0.999], [1, 1.5, -0.1, *NON_FINITE]),
    (_validate.PROBABILITY, [0, 1], [1.01, *NON_FINITE]),
    (_validate.OPEN_PROBABILITY, [1e-9, 0.5], [0, 1, *NON_FINITE]),
])
def test_range_accepts_its_numbers_and_refuses_the_rest(allowed, good, bad):
    for value in good:
        assert allowed.check("x", value) == float(value)
    for value in bad:
        with pytest.raises(ValueError, match=r"^x must be .*, got "):
            allowed.check("x", value)


@pytest.mark.parametrize("value", [True, "0.5", None, [1.0], torch.tensor(0.5)])
def test_range_refuses_what_is_not_a_real_number(value):
    with pytest.raises(TypeError, match="rho must be a number"):
        NON_NEGATIVE.check("rho", value)


def test_messages_say_what_was_wanted_and_given():
    assert NON_NEGATIVE.problem(math.nan) == "must be a finite number >= 0, got nan"
    assert POSITIVE.problem(-math.inf) == "must be a finite number > 0, got -inf"
    assert FRACTION.problem(1.5) == "must be in [0, 1), got 1.5"
    assert Range(high=2.0, high_open=True).problem(2) == "must be a finite number < 2, got 2"


def test_finite_tensor_counts_nan_and_inf():
    _validate.finite_tensor("mask", torch.ones(3))
    _validate.finite_tensor("mask", torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask contains NaN or inf \(1 NaN, 2 inf\)"):
        _validate.finite_tensor("mask", torch.tensor([math.nan, math.inf, -math.inf, 1.0]))


# --- every float flag of the CLI -----------------------------------------------------------------------


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _float_flags(command: str):
    """(flag, is a list) for every option of ``command`` whose value is a float or a list of floats."""
    for action in _subparsers()[command]._actions:
        if action.option_strings and action.type in (float, float_list, finite_float_list):
            yield action.option_strings[0], action.type is not float, action


OWN_COMMANDS = ("train", "prune", "eval", "report", "demo")
FLAG_CASES = [(command, flag, many) for command in OWN_COMMANDS for flag, many, _ in _float_flags(command)]


def test_the_float_flags_are_found():
    flags = {(command, flag) for command, flag, _ in FLAG_CASES}
    for expected in [("train", "--sam-rho"), ("train", "--lr"), ("train", "--weight-decay"), ("train", "--width"),
                     ("prune", "--sparsity"), ("eval", "--radii"), ("eval", "--pgd-eps"), ("eval", "--sigma"),
                     ("eval", "--alpha"), ("eval", "--cc-eps"), ("demo", "--channel-sparsity")]:
        assert expected in flags


@pytest.mark.parametrize("command, flag, many", FLAG_CASES, ids=[f"{c} {f}" for c, f, _ in FLAG_CASES])
def test_every_float_flag_refuses_non_finite_values_naming_the_flag(capsys, command, flag, many):
    """Checked as the flag is parsed: nothing runs (no data, no output folder), one line, exit 2."""
    action = next(a for f, _, a in _float_flags(command) if f == flag)
    assert isinstance(action, NumberFlag), f"{command} {flag} is declared without a range (use add_number)"
    for text in ("nan", "inf", "-inf"):
        value = f"0.1,{text}" if many else text
        assert run([command, f"{flag}={value}"]) == 2, (flag, text)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"sparsesam {command}: error: {flag} must be ") and f"got {text}" in err, err


@pytest.mark.parametrize("argv, message", [
    (["train", "--sam-rho", "-0.1"], "--sam-rho must be a finite number >= 0, got -0.1"),
    (["train", "--lr", "0"], "--lr must be a finite number > 0, got 0"),
    (["train", "--momentum", "1"], "--momentum must be in [0, 1), got 1"),
    (["prune", "--sparsity", "1"], "--sparsity must be in [0, 1), got 1"),
    (["eval", "m", "--alpha", "1"], "--alpha must be in (0, 1), got 1"),
    (["eval", "m", "--cc-eps", "0.1,0"], "--cc-eps must be in (0, 1], got 0 (entry 2 of 2)"),
    (["eval", "m", "--radii", ","], "--radii must list one or more numbers, each a finite number >= 0"),
    (["demo", "--width", "0"], "--width must be a finite number > 0, got 0"),
])
def test_float_flags_refuse_values_out_of_range(capsys, argv, message):
    assert run(argv) == 2
    assert capsys.readouterr().err.strip() == f"sparsesam {argv[0]}: error: {message}"


def test_a_refused_flag_creates_no_output_folder(tmp_path, capsys):
    assert run(["train", "--sam-rho", "nan", "--out", tmp_path / "out"]) == 2
    assert not (tmp_path / "out").exists()
    assert "--sam-rho must be a finite number >= 0, got nan" in capsys.readouterr().err


def test_reproduce_shares_the_checked_flags(capsys):
    """reproduce's optimizer flags are train's (NumberFlag: one line, exit 2); its lists use the finite-only
    finite_float_list type (argparse's own error, exit 2)."""
    shared = [(flag, action) for flag, _, action in _float_flags("reproduce")
              if isinstance(action, NumberFlag) or action.type is finite_float_list]
    assert {"--lr", "--sam-rho", "--radii", "--pgd-eps", "--cc-eps"} <= {flag for flag, _ in shared}
    for flag, action in shared:
        if action.type is finite_float_list:
            with pytest.raises(SystemExit) as stop:
                run(["reproduce", flag, "nan"])
            assert stop.value.code == 2
        else:
            assert run(["reproduce", flag, "nan"]) == 2
        assert flag in capsys.readouterr().err


def test_floats_type_refuses_non_finite_entries():
    assert finite_float_list("0,0.5") == [0.0, 0.5]
    for text in ("nan", "0.1,inf", "-inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number"):
            finite_float_list(text)


# --- namespaces built in code (demo, reproduce) are checked with the same ranges ------------------------


def _optimizer_namespace(**changes):
    values = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, sam_rho=0.0, adaptive=False)
    values.update(changes)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("field, flag", [("lr", "--lr"), ("momentum", "--momentum"),
                                         ("weight_decay", "--weight-decay"), ("sam_rho", "--sam-rho")])
@pytest.mark.parametrize("value", NON_FINITE)
def test_check_optimizer_arguments_refuses_non_finite(field, flag, value):
    with pytest.raises(ConfigError, match=f"^{flag} must be "):
        check_optimizer_arguments(_optimizer_namespace(**{field: value}))


@pytest.mark.parametrize("field, value, message", [
    ("radii", [0.0, math.nan], "--radii must be a finite number >= 0, got nan (entry 2 of 2)"),
    ("pgd_eps", [math.inf], "--pgd-eps must be a finite number >= 0, got inf (entry 1 of 1)"),
    ("sigma", math.nan, "--sigma must be a finite number > 0, got nan"),
    ("alpha", math.nan, "--alpha must be in (0, 1), got nan"),
    ("cc_eps", [], "--cc-eps must list one or more numbers"),
])
def test_check_eval_arguments_refuses_non_finite(field, value, message):
    values = dict(execution=None, corruptions=[], severities=[1], pgd_eps=[0.0], sigma=0.25, alpha=0.001,
                  radii=[0.0], cc_transforms=[], cc_eps=[0.1])
    values[field] = value
    with pytest.raises(ConfigError) as error:
        check_eval_arguments(argparse.Namespace(**values))
    assert str(error.value).startswith(message)


# --- algorithm configs and --set -------------------------------------------------------------------------


def _float_fields():
    for name, algorithm in sorted(ALGORITHMS.items()):
        cls = config_class(algorithm)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if float in (typing.get_args(hints[field.name]) or (hints[field.name],)):
                yield name, field.name


FLOAT_FIELDS = list(_float_fields())


def test_every_algorithm_has_float_fields():
    assert {name for name, _ in FLOAT_FIELDS} == set(ALGORITHMS)


@pytest.mark.parametrize("algorithm, field", FLOAT_FIELDS, ids=[f"{a}.{f}" for a, f in FLOAT_FIELDS])
def test_every_float_config_field_refuses_non_finite(algorithm, field):
    cls = config_class(ALGORITHMS[algorithm])
    for value in NON_FINITE:
        with pytest.raises(ValueError, match=f"{field} must be "):
            cls(**{field: value})


@pytest.mark.parametrize("algorithm, field", FLOAT_FIELDS, ids=[f"{a}.{f}" for a, f in FLOAT_FIELDS])
def test_set_reads_nan_and_inf_as_floats_and_the_config_refuses_them(algorithm, field):
    """--set lr=nan is the float NaN (then refused naming the field), not the string 'nan'."""
    for text in ("nan", "inf", "-inf", "NaN", "Infinity"):
        with pytest.raises(ConfigError, match=f"{field} must be (a finite number|in ).*, got "):
            build_config(ALGORITHMS[algorithm], 0.5, {field: text})


def test_set_with_nan_exits_2_naming_the_field(capsys, tmp_path):
    assert run(["prune", "--algorithm", "magnitude", "--set", "lr=nan", "--dataset", "digits",
                "--out", tmp_path / "x"]) == 2
    assert capsys.readouterr().err.strip() == \
        "sparsesam prune: error: MagnitudeConfig: lr must be a finite number > 0, got nan"


# --- optimizers -------------------------------------------------------------------------------------------


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize("value", [*NON_FINITE, -1.0])
def test_sam_refuses_bad_eps_and_rho(value):
    with pytest.raises(ValueError, match="^eps must be a finite number >= 0"):
        SAM(_params(), torch.optim.SGD, rho=0.05, eps=value, lr=0.1)
    with pytest.raises(ValueError, match="^rho must be a finite number >= 0"):
        SAM(_params(), torch.optim.SGD, rho=value, lr=0.1)
    with pytest.raises(ValueError, match="^param group rho must be a finite number >= 0"):
        SAM([{"params": _params(), "rho": value}], torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("setting", ["lr", "momentum", "dampening", "weight_decay"])
@pytest.mark.parametrize("value", NON_FINITE)
def test_fused_sgd_refuses_non_finite_settings(setting, value):
    message = f"^{setting} must be a finite number"  # not torch.optim.SGD's "Invalid learning rate: -inf"
    with pytest.raises(ValueError, match=message):
        FusedMaskedSGD(_params(), **{"lr": 0.1, setting: value})
    with pytest.raises(ValueError, match=message):  # SAM's base optimizer is a FusedMaskedSGD
        SAM(_params(), torch.optim.SGD, rho=0.05, **{"lr": 0.1, setting: value})


def test_fused_sgd_refuses_a_setting_changed_to_nan_after_construction():
    params = _params()
    optimizer = FusedMaskedSGD(params, lr=0.1, momentum=0.9)
    optimizer.param_groups[0]["lr"] = math.nan  # e.g. a scheduler gone wrong
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="^lr must be a finite number >= 0, got nan"):
        optimizer.step()
    assert torch.equal(params[0].detach(), torch.ones(3))  # refused before any write
    with pytest.raises(ValueError, match="^lr must be a finite number >= 0"):
        FusedMaskedSGD(_params(), lr=torch.tensor(math.inf))  # a tensor lr, as torch.optim.SGD allows


# --- masks refuse inf as well as NaN ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_op_masks_refuse_nan_and_inf(bad):
    from sparsesam.ops import masked_conv2d, masked_linear
    weight = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[1, 2] = bad
    with pytest.raises(ValueError, match=r"mask contains NaN or inf"):
        masked_linear(torch.randn(2, 6), weight, mask)
    conv_mask = torch.ones(4, 3, 3, 3)
    conv_mask[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"mask contains NaN or inf"):
        masked_conv2d(torch.rand(1, 3, 5, 5), torch.randn(4, 3, 3, 3), conv_mask)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_sparse_formats_refuse_nan_and_inf_masks(bad):
    from sparsesam.sparse import BSRPattern, CSRPattern, NMPattern, block_structure_error, largest_blocksize
    from sparsesam.sparse.nm import detect
    mask = torch.ones(8, 8)
    mask[0, 0] = bad  # inf != 0 would be kept as if it were 1
    for build in (lambda: CSRPattern.from_mask(mask), lambda: BSRPattern.from_mask(mask, 4),
                  lambda: NMPattern.from_mask(mask, 2, 4), lambda: block_structure_error(mask, 4),
                  lambda: largest_blocksize(mask), lambda: detect(mask)):
        with pytest.raises(ValueError, match=r"mask contains NaN or inf"):
            build()


def test_block_sparse_layer_says_why_a_mask_with_inf_cannot_run_block_sparse():
    from sparsesam.nn import BlockSparseLinear
    mask = torch.ones(8, 8)
    mask[0, 0] = math.inf
    assert BlockSparseLinear.applicable(mask) == "the mask contains NaN or inf"
