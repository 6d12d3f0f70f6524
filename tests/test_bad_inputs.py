"""scripts/bad_inputs.py (the README's "input | what happens" table): its fast rows, run now, get what the
README says they get, so that the table cannot drift from the code."""
from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("bad_inputs", os.path.join(ROOT, "scripts", "bad_inputs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bad_inputs = _load_script()


def readme_rows() -> dict:
    """``{input: what happens}`` of the README's bad-input table."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| (.+?) \| (.+) \|", line)
        if match and match.group(1) not in ("input", "---"):
            rows[match.group(1)] = match.group(2)
    return rows


# A handful of fast rows: settings refused by the CLI and the Python API, a bad checkpoint, an abstention.
CHECKED = ["`sparsesam train --sam-rho nan`", "`sparsesam eval MODEL --radii 0,nan`",
           "`sparsesam prune --set lr=nan`", "`train --resume` with an empty checkpoint",
           "`SAM(params, rho=0.05, eps=nan)`", "`FusedMaskedSGD(params, lr=nan)`",
           "`CSRPattern.from_mask` of a mask holding inf", "`robust.predict` of a model whose logits are +inf"]


def test_the_readme_table_lists_every_case_of_the_script():
    assert list(readme_rows()) == [case.label for case in bad_inputs.CASES]


@pytest.mark.parametrize("label", CHECKED)
def test_fast_rows_get_what_the_readme_says(label, tmp_path):
    case = next(case for case in bad_inputs.CASES if case.label == label)
    assert not case.trains
    assert bad_inputs.attempt(case, bad_inputs.Scratch(str(tmp_path))) == readme_rows()[label]


def test_cli_rows_report_exit_status_and_the_error_line(tmp_path):
    case = bad_inputs.Case("x", bad_inputs.cli("train", "--lr", "nan"))
    assert bad_inputs.attempt(case, bad_inputs.Scratch(str(tmp_path))) == \
        "exit 2: `sparsesam train: error: --lr must be a finite number > 0, got nan`"
    case = bad_inputs.Case("x", bad_inputs.python(lambda: 1 / 0))
    assert bad_inputs.attempt(case, bad_inputs.Scratch(str(tmp_path))) == "`ZeroDivisionError: division by zero`"
    assert bad_inputs.table([("a | b", "c")]) == "| input | what happens |\n|---|---|\n| a | b | c |"
