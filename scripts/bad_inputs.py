"""Run sparsesam on bad input and print what happens, as the README's "input | what happens" table.

    python scripts/bad_inputs.py           # every case (trains a tiny model: about a minute on 2 cores)
    python scripts/bad_inputs.py --fast    # only the cases that need no trained model (seconds)

Every row is measured now, not written down: a CLI case runs ``sparsesam``
in-process (``sparsesam.cli.main``) and reports its exit status and the
error line it printed (an uncaught exception: exit 1 and the exception, as
Python would print it last); a Python case calls the API and reports the
exception it raised or the value it returned. The CLI cases run on tiny
data (``--dataset digits --image-size 8 --limit 96 --batch-size 32``, a
quarter-width SmallCNN), which the table leaves out. tests/test_bad_inputs.py
runs the fast rows through :func:`attempt` and checks what they get, so
the README's table cannot drift far from the code.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

NAN, INF = math.nan, math.inf
TINY = ["--dataset", "digits", "--image-size", "8", "--limit", "96", "--batch-size", "32", "--no-progress",
        "--model", "smallcnn", "--width", "0.25"]
CHEAP_EVAL = ["--no-corruptions", "--no-pgd", "--no-smoothing", "--no-cc-cert", "--latency-repeats", "1"]


class Scratch:
    """A temporary folder for one table's runs, and the tiny trained model the file cases corrupt copies of."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._model: Optional[str] = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def model_dir(self) -> str:
        """A model folder from ``sparsesam train`` (1 epoch), trained on the first call."""
        if self._model is None:
            out = self.path("trained")
            code, err = run_cli(["train", *TINY, "--epochs", "1", "--out", out])
            if code != 0:
                raise RuntimeError(f"training the scratch model failed: {err}")
            self._model = out
        return self._model

    def copy_of_model(self, name: str) -> str:
        """A fresh copy of the trained model folder (each case corrupts its own; its name is the case's, so the
        table's messages are the same on every run)."""
        import shutil
        target = os.path.join(self.folder, name, "model")
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.copytree(self.model_dir(), target)
        return target


@dataclass(frozen=True)
class Case:
    """One row: ``label`` (markdown) and ``run(scratch) -> what happens``; ``trains``: needs a trained model
    or trains one itself (left out by --fast)."""

    label: str
    run: Callable[[Scratch], str]
    trains: bool = False


# --- running a case -----------------------------------------------------------------------------------------


def run_cli(argv: Sequence[str]) -> Tuple[int, str]:
    """``sparsesam ARGV`` in-process: (exit status, what it printed on stderr)."""
    from sparsesam.cli import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse's own errors
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception as error:  # what `python -m sparsesam.cli` would end with: a traceback, exit 1
            return 1, f"Traceback ... {type(error).__name__}: {error}"
    return code, err.getvalue()


def error_line(stderr: str) -> str:
    """The line of ``stderr`` that says what went wrong (argparse prints its usage first)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in lines:
        if ": error: " in line or line.startswith("Traceback"):
            return line.strip()
    return lines[0].strip() if lines else ""


def cli(*argv) -> Callable[[Scratch], str]:
    """A CLI case; ``{scratch}`` in an argument is replaced by the scratch folder, and a callable argument is
    called with the scratch (to build a bad file first)."""
    def run(scratch: Scratch) -> str:
        args = [a(scratch) if callable(a) else str(a).replace("{scratch}", scratch.folder) for a in argv]
        code, err = run_cli(args)
        line = error_line(err).replace(scratch.folder, "DIR")  # the same table from any temporary folder
        return f"exit {code}" + (f": `{_cell(line)}`" if line else "")
    return run


def python(function: Callable[[], object], describe: Callable[[object], str] = repr) -> Callable[[Scratch], str]:
    """A Python API case: the exception it raises (type and message), or what it returns."""
    def run(scratch: Scratch) -> str:
        try:
            value = function()
        except Exception as error:
            return f"`{type(error).__name__}: {_cell(str(error).splitlines()[0] if str(error) else '')}`"
        return f"returns `{_cell(describe(value))}`"
    return run


def _cell(text: str) -> str:
    """Text that fits in a markdown table cell (no pipe ends the cell, no backquote ends the code span)."""
    return text.replace("|", "\\|").replace("`", "'")


def attempt(case: Case, scratch: Scratch) -> str:
    """What happens when ``case`` runs, in a table cell."""
    return case.run(scratch)


# --- building the bad inputs ---------------------------------------------------------------------------------


def _bad_checkpoint(name: str, content: bytes) -> Callable[[Scratch], str]:
    """An output folder ``name`` whose checkpoint.pt holds ``content``; returns the folder."""
    def make(scratch: Scratch) -> str:
        out = scratch.path(name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
            f.write(content)
        return out
    return make


def _truncated_checkpoint(scratch: Scratch) -> str:
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(64)}, "epoch": 1}, buffer)
    return _bad_checkpoint("truncated", buffer.getvalue()[: len(buffer.getvalue()) // 2])(scratch)


def _truncated_weights(scratch: Scratch) -> str:
    folder = scratch.copy_of_model("truncated-weights")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return folder


def _corrupt_model_json(scratch: Scratch) -> str:
    folder = scratch.copy_of_model("corrupt-json")
    with open(os.path.join(folder, "model.json"), "w") as f:
        f.write('{"spec": {"model": "smallcnn", ')
    return folder


def _masked_linear(mode: str = "fixed"):
    from sparsesam.nn import MaskedLinear
    torch.manual_seed(0)
    return MaskedLinear(6, 4, mask_mode=mode)


def _with(value: float, shape=(4, 6), where=(1, 2)) -> torch.Tensor:
    mask = torch.ones(*shape)
    mask[where] = value
    return mask


def _params():
    return [nn.Parameter(torch.ones(3))]


def _sam(**kwargs):
    from sparsesam.optim import SAM
    return SAM(_params(), torch.optim.SGD, **{"lr": 0.1, **kwargs})


def _fused_sgd(**kwargs):
    from sparsesam.optim.fused_sgd import FusedMaskedSGD
    return FusedMaskedSGD(_params(), **kwargs)


def _sgd_step(lr: float):
    from sparsesam import ops
    ops.sgd_step_([torch.randn(5, 3)], [torch.randn(5, 3)], [torch.zeros(5, 3)], [None], lr=lr, momentum=0.9)


def _sam_perturb(rho: float):
    from sparsesam import ops
    params, grads = [torch.randn(5, 3)], [torch.randn(5, 3)]
    sq_norm = ops.sam_grad_sq_norm(grads, [], [None])
    ops.sam_perturb_([torch.empty(5, 3)], params, grads, [None], [torch.tensor(rho)], sq_norm)


def _magnitude_prune_nan():
    from sparsesam.nn import sparsify
    from sparsesam.pruning import magnitude_prune
    model = sparsify(nn.Sequential(nn.Linear(6, 4)))
    with torch.no_grad():
        model[0].weight[0, 0] = NAN
    return magnitude_prune(model, 0.5)


def _sparsify_include_123():
    from sparsesam.nn import sparsify
    return sparsify(nn.Sequential(nn.Linear(6, 4)), include=123)


def _magnitude_prune_string():
    from sparsesam.nn import sparsify
    from sparsesam.pruning import magnitude_prune
    return magnitude_prune(sparsify(nn.Sequential(nn.Linear(6, 4))), "0.5")


def _bsr_wrong_block():
    from sparsesam.ops import bsr_linear
    from sparsesam.sparse import BSRPattern
    pattern = BSRPattern.from_mask(torch.ones(8, 8), 4)  # 4 blocks of 4x4
    return bsr_linear(torch.randn(2, 8), torch.randn(4, 2, 2), pattern)


def _config(**fields):
    from sparsesam.algorithms import MagnitudeConfig
    return MagnitudeConfig(**fields)


def _masked_linear_op(mask: torch.Tensor):
    from sparsesam.ops import masked_linear
    return masked_linear(torch.randn(2, 6), torch.randn(4, 6), mask)


def _masked_conv2d_op(**kwargs):
    from sparsesam.ops import masked_conv2d
    return masked_conv2d(torch.rand(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.ones(4, 3, 3, 3), **kwargs)


def _csr_pattern(mask: torch.Tensor):
    from sparsesam.sparse import CSRPattern
    return CSRPattern.from_mask(mask)


class _NonFinite(nn.Module):
    """A classifier whose logits are ``value`` for class 0 (argmax would read it as class 0) and 0 elsewhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3)
        logits[:, 0] = self.value
        return logits


class _Constant(nn.Module):
    def forward(self, x):
        return torch.tensor([[0.0, 5.0, 0.0]]).expand(x.shape[0], 3)


def _certify(model: nn.Module, sigma: float):
    from sparsesam.robust import certify
    return certify(model, torch.full((1, 4, 4), 0.5), sigma=sigma, n0=8, n=64, alpha=0.001, batch_size=64)


def _predict(model: nn.Module):
    from sparsesam.robust import predict
    return predict(model, torch.full((1, 4, 4), 0.5), sigma=0.25, n=64, alpha=0.001, batch_size=64)


def _abstains(value) -> str:
    from sparsesam.robust import ABSTAIN
    prediction = value[0] if isinstance(value, tuple) else value
    return f"{value!r}" + (" (abstains)" if prediction == ABSTAIN else "")


CASES: List[Case] = [
    # Settings: every float finite and in its range (CLI: one line naming the flag, exit 2).
    Case("`sparsesam train --sam-rho nan`", cli("train", *TINY, "--sam-rho", "nan", "--out", "{scratch}/t")),
    Case("`sparsesam train --lr inf`", cli("train", *TINY, "--lr", "inf", "--out", "{scratch}/t")),
    Case("`sparsesam train --weight-decay nan`", cli("train", *TINY, "--weight-decay", "nan", "--out", "{scratch}/t")),
    Case("`sparsesam train --momentum 1`", cli("train", *TINY, "--momentum", "1", "--out", "{scratch}/t")),
    Case("`sparsesam eval MODEL --radii 0,nan`", cli("eval", "{scratch}/none", "--radii", "0,nan")),
    Case("`sparsesam eval MODEL --pgd-eps nan`", cli("eval", "{scratch}/none", "--pgd-eps", "nan")),
    Case("`sparsesam eval MODEL --sigma inf`", cli("eval", "{scratch}/none", "--sigma", "inf")),
    Case("`sparsesam prune --sparsity nan`", cli("prune", "--algorithm", "magnitude", "--sparsity", "nan",
                                                 "--out", "{scratch}/p")),
    Case("`sparsesam prune --set lr=nan`", cli("prune", "--algorithm", "magnitude", "--set", "lr=nan", *TINY,
                                               "--out", "{scratch}/p")),
    Case("`sparsesam prune --set tau=inf` (C-SAM)", cli("prune", "--algorithm", "csam", "--set", "tau=inf", *TINY,
                                                        "--out", "{scratch}/p")),
    Case("`sparsesam demo --channel-sparsity inf`", cli("demo", "--channel-sparsity", "inf")),
    Case("`sparsesam reproduce --radii nan`", cli("reproduce", "--radii", "nan")),
    # Training that diverges: stopped, nothing exported (exit 3).
    Case("`sparsesam train --lr 1e6`", cli("train", *TINY, "--epochs", "2", "--lr", "1e6", "--out", "{scratch}/d"),
         trains=True),
    Case("`sparsesam prune --algorithm magnitude --set lr=1e6`",
         cli("prune", "--algorithm", "magnitude", "--set", "lr=1e6", "--set", "finetune_epochs=1", *TINY,
             "--epochs", "1", "--out", "{scratch}/dp"), trains=True),
    # Files: one line naming the file, exit 2.
    Case("`train --resume` with a checkpoint of random bytes",
         cli("train", *TINY, "--resume", "--out", _bad_checkpoint("random-bytes", bytes(range(256)) * 4))),
    Case("`train --resume` with an empty checkpoint",
         cli("train", *TINY, "--resume", "--out", _bad_checkpoint("empty", b""))),
    Case("`train --resume` with a truncated checkpoint",
         cli("train", *TINY, "--resume", "--out", _truncated_checkpoint)),
    Case("`eval` of a folder whose `model.safetensors` is truncated",
         cli("eval", _truncated_weights, *CHEAP_EVAL, "--no-progress"), trains=True),
    Case("`eval` of a folder whose `model.json` is corrupt",
         cli("eval", _corrupt_model_json, *CHEAP_EVAL, "--no-progress"), trains=True),
    Case("`prune --from` a folder whose `model.safetensors` is truncated",
         cli("prune", "--algorithm", "magnitude", "--from", _truncated_weights, *TINY, "--out", "{scratch}/pf"),
         trains=True),
    # Optimizers and ops.
    Case("`SAM(params, rho=0.05, eps=nan)`", python(lambda: _sam(rho=0.05, eps=NAN))),
    Case("`SAM(params, rho=0.05, eps=inf)`", python(lambda: _sam(rho=0.05, eps=INF))),
    Case("`SAM(params, rho=nan)`", python(lambda: _sam(rho=NAN))),
    Case("`SAM(params, torch.optim.SGD, rho=0.05, lr=nan)`", python(lambda: _sam(rho=0.05, lr=NAN))),
    Case("`FusedMaskedSGD(params, lr=nan)`", python(lambda: _fused_sgd(lr=NAN))),
    Case("`FusedMaskedSGD(params, lr=0.1, weight_decay=inf)`", python(lambda: _fused_sgd(lr=0.1, weight_decay=INF))),
    Case("`ops.sgd_step_(..., lr=nan)`", python(lambda: _sgd_step(NAN))),
    Case("`ops.sam_perturb_` with rho -1", python(lambda: _sam_perturb(-1.0))),
    Case("`MagnitudeConfig(lr=inf)`", python(lambda: _config(lr=INF))),
    # Masks and pruning.
    Case("`magnitude_prune` on NaN weights", python(_magnitude_prune_nan)),
    Case("`ops.masked_linear` with a float mask holding inf", python(lambda: _masked_linear_op(_with(INF)))),
    Case("`CSRPattern.from_mask` of a mask holding inf", python(lambda: _csr_pattern(_with(INF)))),
    Case("trainable `MaskedLinear.set_mask(inf)`", python(lambda: _masked_linear("trainable").set_mask(_with(INF)))),
    Case("`ops.masked_conv2d(..., stride=2.5)`", python(lambda: _masked_conv2d_op(stride=2.5))),
    Case("`sparsify(model, include=123)`", python(_sparsify_include_123)),
    Case("`magnitude_prune(model, sparsity=\"0.5\")`", python(_magnitude_prune_string)),
    Case("`ops.bsr_linear` given values of the wrong block shape", python(_bsr_wrong_block)),
    # Certificates.
    Case("`robust.certify(model, x, sigma=inf, ...)`", python(lambda: _certify(_Constant(), INF), _abstains)),
    Case("`robust.certify` of a model whose logits are NaN", python(lambda: _certify(_NonFinite(NAN), 0.25),
                                                                   _abstains)),
    Case("`robust.predict` of a model whose logits are +inf", python(lambda: _predict(_NonFinite(INF)), _abstains)),
]


def run_cases(cases: Sequence[Case], folder: Optional[str] = None) -> List[Tuple[str, str]]:
    """``[(input, what happens)]`` for ``cases``, run in ``folder`` (default: a temporary one)."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="sparsesam-bad-inputs-"))
        scratch = Scratch(folder)
        return [(case.label, attempt(case, scratch)) for case in cases]


def table(rows: Sequence[Tuple[str, str]]) -> str:
    return "\n".join(["| input | what happens |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the cases that need no trained model")
    args = parser.parse_args(argv)
    cases = [case for case in CASES if not (args.fast and case.trains)]
    print(table(run_cases(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
