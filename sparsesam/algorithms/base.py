"""What every algorithm shares: the fit() driver, its result, and the checkpoint protocol.

An algorithm is a list of phases (name, epochs); each phase begins with a
transition of the model (sparsify, prune, attach or freeze scores, binarise)
and then runs epochs of its own training step. fit() drives that list and,
at the end of every epoch, hands ``checkpoint.save`` everything needed to
continue exactly where it stopped: the model's and optimizer's state dicts,
the algorithm's own state, the phase and epoch counters, the history and
the random number generators (torch's, CUDA's and the train loader's).

What runs where. A phase whose masks no longer change (``fixed_mask_phases``,
the fine-tuning of every algorithm) runs its masked layers in the form the
config's ``execution`` asks for ("auto" by default: each layer times dense
and the sparse formats its mask allows on a training batch and keeps the
fastest; "dense"; "sparse"; a format's name), settled after the phase's
transition and before its optimizer is built. A phase that fine-tunes a
channel-pruned model (``_compacts(phase)``) trains the physically smaller
model (see _compacted.py) and is expanded back into the original,
masked and gated architecture at the end of the run. The other phases
(dense training, score / mask search) run dense: their masks change at
every step. fit() returns the model in dense masked form (convert it with
set_execution for deployment); ``summary["execution"]`` holds the form
every layer ran in during each fixed-mask phase.

Resuming rebuilds the model's *structure* for the saved phase (layers
swapped for masked ones, scores attached, gates on) with
``_restructure(phase)`` -- no data-dependent value is computed there --
after loading the algorithm's own state (so the structure may depend on
it), rebuilds the compacted structure from the saved channel indices,
loads the saved values (always saved in dense form), converts each layer
to the form it was saved in, and only then builds the optimizer; so a run
interrupted after epoch k and resumed ends with the same bits as one that
never stopped.

Under torchrun (see sparsesam.distributed) fit(..., parallel=wrap_ddp)
trains each phase's epochs through ``parallel(model)``, built anew after
every phase transition (masks, scores, compaction change the module
tree), once the fixed-mask layers' forms are rank 0's (an "auto" timing
may choose otherwise on another rank). Each epoch reshuffles the
DistributedSampler (``set_epoch``) and reseeds the global generators from
(seed, rank, epoch); the epoch's metrics are the means over all ranks;
rank 0 alone evaluates ``val_loader`` and shows progress. Only algorithms whose ``data_parallel`` is True accept
``parallel`` (every built-in one): their phases train with a step DDP can
average, and whatever their search learns or measures is equal on every
rank (learnt scores, rates and soft masks are parameters DDP averages;
AdaSAP's Taylor scores are averaged over the ranks; see each algorithm's
docstring). A user's algorithm that keeps rank-local state leaves it False.

A checkpoint is duck-typed: ``load() -> Optional[dict]`` and
``save(state: dict)``; sparsesam.checkpoint.Checkpointer writes it to disk
atomically. A saved state of another algorithm, state version, config,
phase, model or width is refused with a one-line BadCheckpointError naming
the checkpoint's file (``Checkpointer.path``), before anything is trained. The state holds only tensors, numbers, strings, lists and dicts
(``torch.load(weights_only=True)`` can read it).
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import READ_ERRORS, checkpoint_source, restore_state
from ..file_errors import BadCheckpointError, describe
from ..distributed import (all_reduce_mean, is_main_process, on_main_process, reseed_for_epoch, set_sampler_epoch,
                           world)
from ..divergence import TrainingDiverged, check_state
from ..nn import set_execution
from ..training import evaluate
from . import _compacted, _execution
from ._config import check_config

STATE_VERSION = 2  # 2: the layers' execution forms and the compaction record are part of the state
# Everything fit() saves at the end of an epoch (and needs to resume).
_STATE_KEYS = ("algorithm", "version", "config", "phase", "epoch", "step", "model", "optimizer", "forms",
               "compaction", "algorithm_state", "history", "rng")


@dataclass
class FitResult:
    """What fit() returns: the sparsified model, one dict per epoch, and a summary of the run.

    compact_model: for structured algorithms, the physically smaller plain
    model that computes what ``model`` computes (None otherwise).
    """

    model: nn.Module
    history: List[Dict[str, Any]]
    summary: Dict[str, Any]
    compact_model: Optional[nn.Module] = None


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine annealing from base_lr (epoch 0) towards 0, one value per epoch: stateless, so resuming is trivial."""
    if epochs <= 1:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def set_lr(optimizer: torch.optim.Optimizer, lrs: Sequence[float]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def example_input(loader: DataLoader) -> torch.Tensor:
    """One training image as a batch of one: for tracing graphs, without drawing from any random stream."""
    x = loader.dataset[0][0]
    return x.unsqueeze(0) if isinstance(x, torch.Tensor) else torch.as_tensor(x).unsqueeze(0)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _Batches:
    """The epoch's progress bar, yielding batches moved to the model's device (the loader gives CPU tensors)."""

    def __init__(self, bar, device: torch.device) -> None:
        self.bar = bar
        self.device = device

    def __iter__(self):
        for x, y in self.bar:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def set_postfix(self, *args, **kwargs) -> None:
        self.bar.set_postfix(*args, **kwargs)


def on_device(loader: DataLoader, device: torch.device):
    """``loader``'s batches moved to ``device``."""
    return _Batches(loader, device)


def _rng_state(loader: DataLoader) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _set_rng_state(loader: DataLoader, state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(loader, "generator", None)
    if generator is not None:
        if "loader" not in state:
            raise ValueError("the checkpoint has no train-loader generator state but train_loader has a generator")
        generator.set_state(state["loader"])


def _finite(record: Dict[str, Any], where: str, hint: str) -> None:
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainingDiverged(f"the epoch's {key} is {value}", epoch=record["epoch"] + 1, where=where,
                                   hint=hint)


class Algorithm(ABC):
    """Base of the algorithms: subclasses define phases and what one phase does.

    Subclasses implement:

    * ``phases() -> [(name, epochs), ...]``
    * ``_enter(phase, model, loader)``: the transition into ``phase`` during a run;
    * ``_restructure(phase, model)``: only the structure ``phase`` runs on
      (applied to the caller's fresh model when resuming);
    * ``_optimizer(phase, model) -> (optimizer, base learning rates)``;
    * ``_train_epoch(phase, epoch, model, loader, optimizer, bar) -> dict``
      of mean loss, accuracy and anything else worth a history column;
    * ``_sparsity(model) -> float`` and ``_summary(model, loader) -> dict``;
    * optionally ``_state() / _load_state(dict)`` for their own counters;
    * optionally ``fixed_mask_phases`` (the phases whose masks do not change,
      which run in ``config.execution``) and ``_compacts(phase)`` (the phase
      trains the compacted model of a channel-pruned one).
    """

    config_type: type = object
    name: str = "algorithm"
    fixed_mask_phases: Tuple[str, ...] = ("finetune",)
    # Whether fit() may train it data-parallel (``parallel=``): every phase's step is one DDP can average, and
    # nothing a phase transition or an epoch computes depends on the rank's share of the data beyond what
    # sync_masks and DDP's broadcast at wrapping make equal.
    data_parallel: bool = False

    def _compacts(self, phase: str) -> bool:
        """Whether ``phase`` trains the physically compacted model (channel pruning); default: no."""
        return False

    def __init__(self, config=None) -> None:
        if config is None:
            config = self.config_type()
        if not isinstance(config, self.config_type):
            raise TypeError(f"config must be a {self.config_type.__name__}, got {type(config).__name__}")
        check_config(config)
        self.config = config
        self.step = 0  # optimisation steps taken so far; seeds per-step randomness (attacks, transforms)

    # ------------------------------------------------------------ to override
    @abstractmethod
    def phases(self) -> List[Tuple[str, int]]:
        """The (phase name, epochs) of a run, in order."""

    @abstractmethod
    def _enter(self, phase: str, model: nn.Module, loader: DataLoader) -> None:
        """The transition into ``phase`` during a run (e.g. prune, attach scores)."""

    @abstractmethod
    def _restructure(self, phase: str, model: nn.Module, loader: DataLoader) -> None:
        """Only the structure ``phase`` runs on (applied to a fresh model when resuming)."""

    @abstractmethod
    def _optimizer(self, phase: str, model: nn.Module) -> Tuple[torch.optim.Optimizer, List[float]]:
        """The optimizer of ``phase`` and its base learning rates (one per group)."""

    @abstractmethod
    def _train_epoch(self, phase: str, epoch: int, model: nn.Module, loader: DataLoader,
                     optimizer: torch.optim.Optimizer, bar) -> Dict[str, float]:
        """One epoch of ``phase``: mean loss, accuracy and any other history column."""

    @abstractmethod
    def _sparsity(self, model: nn.Module) -> float:
        """The fraction of prunable weights that are pruned now."""

    def _summary(self, model: nn.Module, loader: DataLoader) -> Tuple[Dict[str, Any], Optional[nn.Module]]:
        return {}, None

    def _state(self) -> Dict[str, Any]:
        return {}

    def _load_state(self, state: Dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------- fit
    def fit(self, model: nn.Module, train_loader: DataLoader, *, val_loader: Optional[DataLoader] = None,
            progress: bool = True, checkpoint=None, parallel=None) -> FitResult:
        """Sparsify ``model`` (in place) by this algorithm; see the class docstring for what it does.

        checkpoint: an object with ``load() -> Optional[dict]`` and
        ``save(state)``; if load() returns a state, the run continues from it
        (``model`` must then be the same fresh model the run started from).
        parallel: under torchrun, ``sparsesam.distributed.wrap_ddp`` (or any
        callable giving the module the epochs train through); only for
        algorithms with ``data_parallel`` (see the module docstring).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if parallel is not None and not callable(parallel):
            raise TypeError(f"parallel must be callable (e.g. sparsesam.distributed.wrap_ddp), got {parallel!r}")
        if parallel is not None and not self.data_parallel:
            raise ValueError(f"parallel: {self.name!r} cannot train data-parallel (its search keeps rank-local "
                             f"state); run it in one process")
        progress = progress and is_main_process()
        if checkpoint is not None and not (callable(getattr(checkpoint, "load", None))
                                           and callable(getattr(checkpoint, "save", None))):
            raise TypeError("checkpoint must have load() and save(state) methods")
        phases = self.phases()
        history: List[Dict[str, Any]] = []
        phase_seconds: Dict[str, float] = {}  # training seconds per phase in this call (not validation)
        saved = checkpoint.load() if checkpoint is not None else None
        self._reset_phase_state()
        optimizer, base_lrs = None, []
        if saved is None:
            torch.manual_seed(self.config.seed)
            self.step = 0
            start_phase, start_epoch = 0, 0
        else:
            optimizer, base_lrs, history, start_phase, start_epoch = self._resume(saved, checkpoint, model,
                                                                                 train_loader)

        for index in range(start_phase, len(phases)):
            phase, epochs = phases[index]
            if index > start_phase or saved is None:
                optimizer, base_lrs = self.begin_phase(phase, model, train_loader, epochs)
                first = 0
            else:
                first = start_epoch
            # What the epochs train through: DDP over the phase's module tree (built after its transition).
            trainer = parallel(model) if parallel is not None and first < epochs else model
            for epoch in range(first, epochs):
                set_sampler_epoch(train_loader, len(history))  # the run's epoch count, across phases
                reseed_for_epoch(self.config.seed, len(history))
                set_lr(optimizer, [cosine_lr(lr, epoch, epochs) if self.config.cosine else lr for lr in base_lrs])
                bar = tqdm(train_loader, desc=f"{self.name} {phase} {epoch + 1}/{epochs}", disable=not progress,
                           leave=False)
                model.train()
                epoch_began = time.perf_counter()
                where, hint = f"{self.name} {phase}", f"lr {optimizer.param_groups[0]['lr']:g}"
                try:
                    stats = self._train_epoch(phase, epoch, trainer, train_loader, optimizer,
                                              _Batches(bar, model_device(model)))
                    check_state(model)  # BatchNorm statistics can overflow while every loss stays finite
                except TrainingDiverged as error:
                    raise error.locate(epoch=epoch + 1, where=where, hint=hint)
                finally:
                    bar.close()
                if world().size > 1:
                    # The means over every rank's samples; the DistributedSampler gives each rank as many.
                    stats = all_reduce_mean(stats)
                sparsity = self._phase_sparsity if self._phase_sparsity is not None else self._sparsity(model)
                record = {"phase": phase, "epoch": epoch, **{k: float(v) for k, v in stats.items()},
                          "lr": float(optimizer.param_groups[0]["lr"]), "sparsity": float(sparsity)}
                # Timing is kept out of the history (which a resumed run reproduces bit for bit).
                phase_seconds[phase] = phase_seconds.get(phase, 0.0) + time.perf_counter() - epoch_began
                if val_loader is not None:
                    val = on_main_process(evaluate, model, on_device(val_loader, model_device(model)),
                                          progress=False)
                    record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                _finite(record, where, hint)
                history.append(record)
                if checkpoint is not None:
                    checkpoint.save({
                        "algorithm": self.name, "version": STATE_VERSION, "config": asdict(self.config),
                        "phase": phase, "epoch": epoch, "step": self.step,
                        "model": _execution.dense_state(model), "optimizer": optimizer.state_dict(),
                        "forms": self._forms.get(phase), "compaction": self._compaction,
                        "algorithm_state": self._state(), "history": [dict(r) for r in history],
                        "rng": _rng_state(train_loader),
                    })

        trained_compacted = self._expand(model, train_loader)
        # The result is the masked model in dense form whatever its phases ran in: what the pruning tools,
        # exports and summaries read (weights and masks), independent of timing decisions; the forms the
        # phases ran in are in summary["execution"]; set_execution converts it again for deployment.
        set_execution(model, "dense")
        summary, compact = self._summary(model, train_loader)
        summary = {"algorithm": self.name, "target_sparsity": self.config.target_sparsity,
                   "sparsity": float(self._sparsity(model)), "epochs": len(history), **summary,
                   "execution": {phase: dict(forms) for phase, forms in self._forms.items()},
                   "phase_seconds": phase_seconds}
        if trained_compacted is not None:
            summary["trained_compacted"] = {k: trained_compacted[k] for k in
                                            ("params_before", "params_after", "macs_before", "macs_after")}
        if val_loader is not None:
            val = on_main_process(evaluate, model, on_device(val_loader, model_device(model)), progress=False)
            summary.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        return FitResult(model, history, summary, compact)

    def _resume(self, saved: Dict[str, Any], checkpoint, model: nn.Module, train_loader: DataLoader):
        """Put ``model``, the algorithm and the random streams where ``saved`` left them; returns (optimizer,
        base learning rates, history, phase index, first epoch). A state of another algorithm, version,
        config, model or width is a one-line BadCheckpointError naming the checkpoint's file."""
        source = checkpoint_source(checkpoint)
        missing = [key for key in _STATE_KEYS if key not in saved]
        if missing:
            raise BadCheckpointError(source, f"the checkpoint lacks {missing}: it was not written by an "
                                             f"algorithm's fit()")
        if saved["algorithm"] != self.name or saved["version"] != STATE_VERSION:
            raise BadCheckpointError(source, f"the checkpoint is from algorithm {saved['algorithm']!r} (state "
                                             f"version {saved['version']!r}), not {self.name!r} version "
                                             f"{STATE_VERSION}")
        config = asdict(self.config)
        if saved["config"] != config:
            other = saved["config"] if isinstance(saved["config"], dict) else {}
            changed = sorted(key for key in set(other) | set(config) if other.get(key) != config.get(key))
            raise BadCheckpointError(source, "the checkpoint was written with another config: " + ", ".join(
                f"{key} ({other.get(key)!r} -> {config.get(key)!r})" for key in changed))
        names = [name for name, _ in self.phases()]
        if saved["phase"] not in names:
            raise BadCheckpointError(source, f"the checkpoint is in phase {saved['phase']!r}, which "
                                             f"{self.name!r} does not have ({names})")
        phase = saved["phase"]
        try:
            # The structure the saved values belong to; a state of another model or width fails here or
            # in the loading below.
            self._load_state(saved["algorithm_state"])
            self._restructure(phase, model, train_loader)
            self._compaction = saved["compaction"]
            if self._compaction is not None:
                _compacted.rebuild_compact(model, self._compaction, example_input(train_loader).to(model_device(model)))
        except READ_ERRORS as error:
            raise BadCheckpointError(source, f"the checkpoint's algorithm state does not fit this run's model "
                                             f"(another model or width?): {describe(error)}") from error
        restore_state(model, saved, "model", source=source)
        self._phase_sparsity = self._fixed_sparsity(phase, model)
        if saved["forms"] is not None:
            try:
                _execution.restore_forms(model, saved["forms"])
            except READ_ERRORS as error:
                raise BadCheckpointError(source, f"the checkpoint's layer forms do not fit this run's model: "
                                                 f"{describe(error)}") from error
            self._forms[phase] = dict(saved["forms"])
        optimizer, base_lrs = self._optimizer(phase, model)
        restore_state(optimizer, saved, "optimizer", source=source)
        epochs = dict(self.phases())[phase]
        epoch, step = saved["epoch"], saved["step"]
        if not (isinstance(epoch, int) and 0 <= epoch < epochs and isinstance(step, int) and step >= 0):
            raise BadCheckpointError(source, f"the checkpoint is at epoch {epoch!r}, step {step!r} of phase "
                                             f"{phase!r}, which has {epochs} epoch(s)")
        self.step = step
        history = [dict(record) for record in saved["history"]]
        try:
            _set_rng_state(train_loader, saved["rng"])
        except READ_ERRORS as error:
            raise BadCheckpointError(source, f"the checkpoint's random-number state cannot be restored: "
                                             f"{describe(error)}") from error
        return optimizer, base_lrs, history, names.index(phase), epoch + 1

    # ------------------------------------------------------- what runs where
    def _reset_phase_state(self) -> None:
        self._compaction: Optional[Dict[str, Any]] = None  # the compacted phase's record (see _compacted.py)
        self._phase_sparsity: Optional[float] = None       # a fixed-mask phase's sparsity, measured once
        self._forms: Dict[str, Dict[str, str]] = {}         # the layers' forms in each fixed-mask phase

    def begin_phase(self, phase: str, model: nn.Module, loader: DataLoader,
                    epochs: int = 1) -> Tuple[torch.optim.Optimizer, List[float]]:
        """Enter ``phase`` exactly as fit() does: its transition (prune, attach or freeze scores, binarise),
        then the form its layers train in (compacted, or ``config.execution`` for a fixed mask), then its
        optimizer, built last; returns (optimizer, base learning rates). fit() calls it at every phase
        boundary; call it directly to step through one phase by hand (``bench/bench_algorithms.py`` does),
        entering the phases before it first, in order."""
        if phase not in [name for name, _ in self.phases()]:
            raise ValueError(f"phase must be one of {[name for name, _ in self.phases()]}, got {phase!r}")
        if not hasattr(self, "_forms"):
            self._reset_phase_state()
        self._enter(phase, model, loader)
        self._settle(phase, epochs, model, loader)
        return self._optimizer(phase, model)

    def _fixed_sparsity(self, phase: str, model: nn.Module) -> Optional[float]:
        """The sparsity of a phase whose masks do not change, measured once on the dense form."""
        if self._compaction is not None:
            return float(self._compaction["sparsity"])
        if phase in self.fixed_mask_phases:
            return float(self._sparsity(model))
        return None

    def _expand(self, model: nn.Module, loader: DataLoader) -> Optional[Dict[str, Any]]:
        """Put a compacted model back into its masked, gated architecture; returns the compaction record."""
        record, self._compaction = self._compaction, None
        if record is not None:
            _compacted.expand_in_place(model, record, example_input(loader).to(model_device(model)))
        return record

    def _settle(self, phase: str, epochs: int, model: nn.Module, loader: DataLoader) -> None:
        """After ``phase``'s transition: compact the model if the phase trains it compacted, and put the
        fixed-mask layers in ``config.execution`` form (before the optimizer is built). A phase of no epochs
        trains nothing: the model stays as its transition left it."""
        self._expand(model, loader)
        self._phase_sparsity = None
        if epochs == 0:
            return
        if self._compacts(phase):
            sparsity = float(self._sparsity(model))
            self._compaction = _compacted.compact_in_place(model, example_input(loader).to(model_device(model)))
            self._compaction["sparsity"] = sparsity
        self._phase_sparsity = self._fixed_sparsity(phase, model)
        if phase in self.fixed_mask_phases:
            example = _execution.example_batch(loader).to(model_device(model))
            forms = _execution.settle_execution(model, self.config.execution, example)
            if world().size > 1:
                # Every rank trains in rank 0's forms: DDP needs the same parameters everywhere, and
                # "auto" times each rank's own machine.
                agreed = on_main_process(dict, forms)
                if agreed != forms:
                    _execution.restore_forms(model, agreed)
                forms = agreed
            self._forms[phase] = forms
