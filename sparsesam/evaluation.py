"""Measuring a model: clean accuracy, size, CPU latency and robustness, in the form it runs in.

The model runs in the form ``--execution`` asks for (default "auto": each
masked layer is timed dense and in the sparse formats its mask allows, on a
test batch, and keeps the fastest); a structured model runs as its
compacted model (physically smaller, dense). Latency is measured in that
form and in the dense form (masks baked into plain layers, full size), so
the table shows what sparsity buys.

Robustness (each switchable, each on a configurable subset of the test set
so the whole evaluation fits a small budget): mean accuracy under common
corruptions, PGD accuracy against eps, randomized-smoothing certified
accuracy against the L2 radius, and CC-Cert certified accuracy under
semantic transforms.

:func:`evaluate_model` takes its settings as attributes of one namespace
(``sparsesam eval``'s flags, or the study's settings built in code).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import robust
from ._validate import ConfigError
from .model_files import example_input, plain_model
from .robust.attacks_torchattacks import ITERATIONS
from .run_setup import example_batch, in_execution
from .training import evaluate


def size_and_ops(model: nn.Module, spec: Dict[str, Any], compacted: Optional[nn.Module]) -> Dict[str, Any]:
    """Parameters and MACs per example (torch_pruning.utils.count_ops_and_params) of the plain model,
    the non-zero weights, and, for a structured model, the compacted model's figures."""
    from .pruning.channel_graph import import_torch_pruning
    tp = import_torch_pruning()
    x = example_input(spec)
    plain = plain_model(model).eval()  # count_ops_and_params knows nn.Conv2d / nn.Linear, not their subclasses
    macs, params = tp.utils.count_ops_and_params(plain, x)
    zeros = sum(int((layer.weight_mask == 0).sum()) for layer in model.modules() if hasattr(layer, "weight_mask"))
    result = {"parameters": int(params), "macs": float(macs), "nonzero_parameters": int(params) - zeros}
    if compacted is not None:
        c_macs, c_params = tp.utils.count_ops_and_params(compacted, x)
        # The compacted model's own non-zeros, so that "params" and "non-zero params" describe one model.
        c_nonzero = sum(int(torch.count_nonzero(p)) for p in compacted.parameters())
        result.update(compacted_parameters=int(c_params), compacted_macs=float(c_macs),
                      compacted_nonzero_parameters=c_nonzero)
    return result


@torch.no_grad()
def cpu_latencies(models: Dict[str, nn.Module], spec: Dict[str, Any], batch_size: int, repeats: int,
                  warmup: int = 2) -> Dict[str, Dict[str, Any]]:
    """Median (and spread) wall time of a forward pass of each model on one batch of ``batch_size`` random
    images, on the CPU; the models take turns (A B A B ...) so that load on a shared machine hits all alike."""
    for model in models.values():
        model.eval()
    x = torch.rand(batch_size, spec["in_channels"], spec["image_size"], spec["image_size"])
    for _ in range(warmup):
        for model in models.values():
            model(x)
    times: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            began = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - began)
    return {name: {"batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads(),
                   "median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t), "max_ms": 1000 * max(t)}
            for name, t in times.items()}


def cpu_latency(model: nn.Module, spec: Dict[str, Any], batch_size: int, repeats: int, warmup: int = 2) -> Dict[str, Any]:
    """Median (and spread) wall time of a forward pass on a batch of ``batch_size`` random images, on the CPU."""
    return cpu_latencies({"model": model}, spec, batch_size, repeats, warmup)["model"]


def latency_as_run_and_dense(model: nn.Module, dense: nn.Module, spec: Dict[str, Any], batch_size: int,
                             repeats: int) -> Dict[str, Any]:
    """``{"latency": the model as it runs, "latency_dense": the dense form}``, measured in turns (one
    measurement where the model runs dense anyway)."""
    if model is dense:
        latency = cpu_latency(model, spec, batch_size, repeats)
        return {"latency": latency, "latency_dense": latency}
    both = cpu_latencies({"as_run": model, "dense": dense}, spec, batch_size, repeats)
    return {"latency": both["as_run"], "latency_dense": both["dense"]}


def _subset_loader(dataset, count: Optional[int], batch_size: int) -> DataLoader:
    if count is not None and count < len(dataset):
        dataset = Subset(dataset, range(count))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def runnable(model: nn.Module, compacted: Optional[nn.Module], execution: str,
             example: torch.Tensor) -> "tuple[nn.Module, Dict[str, str]]":
    """The model to evaluate and its layers' forms: a structured model's compacted model (all "compacted"),
    or ``model`` converted in place to ``execution`` form."""
    if compacted is not None:
        return compacted.eval(), {"*": "compacted"}
    model.eval()
    forms = in_execution(model, execution, example)
    return model.eval(), forms


def fold_batchnorm(plain: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in an nn.Sequential into that conv.

    ``torch.nn.utils.fusion.fuse_conv_bn_eval`` does the folding (the same
    function up to float rounding); the BatchNorm becomes an Identity. Pairs
    that are not neighbours in a Sequential (ResNet blocks' conv1 / bn1) are
    left as they are. In place; returns ``plain``.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for sequential in [m for m in plain.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequential._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = sequential._modules[first], sequential._modules[second]
            if (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and not norm.training
                    and norm.track_running_stats and norm.running_mean is not None):
                sequential._modules[first] = fuse_conv_bn_eval(conv, norm)
                sequential._modules[second] = nn.Identity()
    return plain


def certificate_form(plain: nn.Module) -> nn.Module:
    """The form the certificates run: the plain model (masks baked in), BatchNorm folded, channels_last.

    Randomized smoothing and CC-Cert run the fixed model on thousands of
    noisy or transformed copies of each image without gradients. The plain
    layers compute the same function as the masked ones (W*M); eval-mode
    BatchNorm after a conv folds into it (``fold_batchnorm``); and oneDNN's
    convolutions are faster on channels_last input for these small images,
    which the fused masked op (contiguous input) does not use. The ratio is
    in bench/RESULTS.md ("Certificates"). ``plain`` is changed in place.
    """
    plain = fold_batchnorm(plain.eval())
    if any(isinstance(m, nn.Conv2d) for m in plain.modules()):
        return plain.to(memory_format=torch.channels_last)
    return plain


def evaluate_model(model: nn.Module, info: Dict[str, Any], test, args: argparse.Namespace,
                   compacted: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Every enabled measurement of ``model`` on ``test`` (a dataset of images in [0, 1])."""
    spec = info["spec"]
    progress = args.progress
    execution = getattr(args, "execution", None) or "auto"
    result: Dict[str, Any] = {"name": args.name or info.get("algorithm") or "dense",
                              "algorithm": info.get("algorithm"), "model": spec["model"], "dataset": spec["dataset"],
                              "sparsity": info.get("sparsity", 0.0), "target_sparsity": info.get("target_sparsity"),
                              "test_examples": len(test)}
    result.update(size_and_ops(model, spec, compacted))  # on the dense masked form
    dense = plain_model(model)  # the masks baked into plain layers: the dense form one would deploy
    model, forms = runnable(model, compacted, execution, example_batch(test, args.batch_size))
    result.update(execution=execution, layer_forms=forms)
    clean = evaluate(model, _subset_loader(test, None, args.batch_size), desc="clean", progress=progress)
    result.update(clean_accuracy=clean["accuracy"], clean_loss=clean["loss"])
    differs = compacted is not None or any(form != "dense" for form in forms.values())
    result.update(latency_as_run_and_dense(model, dense if differs else model, spec, args.latency_batch,
                                           args.latency_repeats))
    if args.corruptions and args.severities:
        loader = _subset_loader(test, args.corruption_examples, args.batch_size)
        if getattr(args, "cifar10c", None):
            if spec["dataset"] != "cifar10":
                raise ConfigError(f"--cifar10c needs a CIFAR-10 model, this one is a {spec['dataset']} model")
            out = robust.evaluate_cifar10c(model, loader, args.cifar10c, corruptions=args.corruptions,
                                           severities=args.severities, batch_size=args.batch_size,
                                           model_name=result["name"], progress=progress)
        else:
            out = robust.evaluate_corruptions(model, loader, corruptions=args.corruptions,
                                              severities=args.severities, seed=args.seed, model_name=result["name"],
                                              progress=progress)
        result["corruption"] = out
        result["mean_corruption_accuracy"] = out["mean_corruption_accuracy"]
    if args.pgd:
        loader = _subset_loader(test, args.pgd_examples, args.batch_size)
        attack = getattr(args, "attack", "pgd")
        # AutoAttack runs at its official settings (100 iterations); the others take --pgd-steps.
        steps = ITERATIONS if attack == "autoattack" else args.pgd_steps
        result["pgd"] = robust.adversarial_accuracy(model, loader, epsilons=args.pgd_eps, attack=attack, norm="linf",
                                                    steps=steps, seed=args.seed, model_name=result["name"],
                                                    progress=progress)
    if args.smoothing or args.cc_cert:
        certified_model = certificate_form(dense)
    if args.smoothing:
        loader = _subset_loader(test, args.smoothing_examples, args.batch_size)
        certified = robust.certify_dataset(certified_model, loader, sigma=args.sigma, n0=args.smoothing_n0, n=args.smoothing_n,
                                           alpha=args.alpha, batch_size=args.smoothing_batch, seed=args.seed,
                                           model_name=result["name"], progress=progress)
        curve = robust.certified_accuracy(certified, args.radii)
        result["smoothing"] = {**{k: v for k, v in certified.items() if k != "records"}, "curve": curve,
                               "records": certified["records"]}
    if args.cc_cert:
        loader = _subset_loader(test, args.cc_examples, args.batch_size)
        ranges = {name: robust.DEFAULT_RANGES[name] for name in args.cc_transforms}
        result["cc_cert"] = robust.cc_cert_dataset(certified_model, loader, transforms=ranges, epsilons=args.cc_eps,
                                                   n_samples=args.cc_samples, seed=args.seed,
                                                   batch_size=args.smoothing_batch, model_name=result["name"],
                                                   progress=progress)
    return result
