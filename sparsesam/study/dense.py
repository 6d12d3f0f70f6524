"""The study's dense starting models: one per (seed, kind), trained until validation accuracy plateaus.

Kinds (``sparsesam.study.plan.DENSE_KINDS``):

* ``clean``: cross-entropy;
* ``pgd_at``: PGD adversarial training (Madry et al.), L-inf ``adv_eps``,
  ``attack_steps`` steps: what HARP fine-tunes;
* ``noise``: cross-entropy on ``x + sigma * N(0, I)``: Cohen et al.'s base
  classifiers for randomized smoothing.

Plateau rule: after every epoch, accuracy on the held-out validation images
(the last ``val_limit`` training images, never trained on); training stops
when the last ``dense_patience`` epochs gained less than ``dense_min_delta``
over the best accuracy before them, or at ``dense_max_epochs``. The model of
the last epoch is kept, and the epoch count is recorded. SGD with a constant
learning rate, checkpointed after every epoch: an interrupted training
resumes where it stopped.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Tuple

import torch
from torch.utils.data import DataLoader

from ..algorithms import make_loss
from ..checkpoint import Checkpointer
from ..data.noise import GaussianNoiseCollate
from ..model_files import build_from_spec, load_model_folder, read_json, save_model_folder, write_json
from ..run_setup import seed_everything
from ..training import DENSE_CHECKPOINT, evaluate, fit_dense

DENSE_FILE = "train.json"


def dense_folder(out: str, seed: int, kind: str) -> str:
    return os.path.join(out, f"seed{seed}", f"dense-{kind}")


def plateaued(accuracies: List[float], patience: int, min_delta: float) -> bool:
    """True when the last ``patience`` accuracies gained less than ``min_delta`` over the best one before them."""
    if len(accuracies) <= patience:
        return False
    return max(accuracies[-patience:]) < max(accuracies[:-patience]) + min_delta


def training_loader(dataset, b: Dict[str, Any], seed: int, noise: bool) -> Tuple[DataLoader, torch.Generator]:
    """Shuffled by its own generator (checkpointed); with noise, Cohen et al.'s Gaussian augmentation per batch."""
    generator = torch.Generator().manual_seed(seed)
    collate = GaussianNoiseCollate(b["sigma"]) if noise else None
    return DataLoader(dataset, batch_size=b["batch_size"], shuffle=True, generator=generator,
                      collate_fn=collate), generator


def train_dense(kind: str, seed: int, spec: Dict[str, Any], train, val, test, b: Dict[str, Any],
                optimizer_args: argparse.Namespace, out: str, progress: bool = False):
    """The seed's ``kind`` dense model: read back if finished, else trained (or resumed) to the plateau."""
    folder = dense_folder(out, seed, kind)
    marker = os.path.join(folder, DENSE_FILE)
    if os.path.isfile(marker):
        return load_model_folder(folder)[0], read_json(marker)
    os.makedirs(folder, exist_ok=True)
    seed_everything(seed)
    model = build_from_spec(spec)
    loader, generator = training_loader(train, b, seed, noise=kind == "noise")
    val_loader = DataLoader(val, batch_size=512, shuffle=False)
    loss_fn = (make_loss("pgd_at", eps=b["adv_eps"], attack_steps=b["attack_steps"], beta=0.0, seed=seed)
               if kind == "pgd_at" else None)
    checkpointer = Checkpointer(os.path.join(folder, DENSE_CHECKPOINT))
    began, cpu_began = time.perf_counter(), time.process_time()
    history: List[dict] = []
    # An interrupted training resumes at its checkpoint's epoch (fit_dense refuses a checkpoint past its count).
    saved = checkpointer.load(required=("epoch",))
    first = saved["epoch"] if saved and isinstance(saved["epoch"], int) and saved["epoch"] > 1 else 1
    for epochs in range(first, b["dense_max_epochs"] + 1):
        # fit_dense continues from the checkpoint of the epoch before (or of an interrupted call).
        args = argparse.Namespace(**{**vars(optimizer_args), "epochs": epochs, "progress": progress, "seed": seed})
        history = fit_dense(model, loader, val_loader, generator, args, checkpointer,
                            label=f"dense-{kind} seed {seed}", loss_fn=loss_fn)
        if plateaued([h["test_accuracy"] for h in history], b["dense_patience"], b["dense_min_delta"]):
            break
    for record in history:  # fit_dense's "test" here is the validation split
        record["val_accuracy"], record["val_loss"] = record.pop("test_accuracy"), record.pop("test_loss")
    save_model_folder(model, spec, folder, extra={"stage": "train", "algorithm": None, "seed": seed, "kind": kind})
    accuracy = evaluate(model, DataLoader(test, batch_size=512, shuffle=False), progress=False)["accuracy"]
    # seconds: this process's share (an interrupted and resumed training counts only its last part).
    info = {"seed": seed, "kind": kind, "epochs": len(history), "plateaued": len(history) < b["dense_max_epochs"],
            "history": history, "test_accuracy": accuracy, "val_accuracy": history[-1]["val_accuracy"],
            "seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu_began}
    write_json(marker, info)
    checkpointer.remove()
    return load_model_folder(folder)[0], info
