"""Robustness evaluation: common corruptions, adversarial attacks and losses,
randomized smoothing, CC-Cert, and plots of their results.

Images are (N, C, H, W) tensors in [0, 1] everywhere; models receive [0, 1]
images (put normalisation inside the model). Every evaluation restores the
model's train/eval mode and its parameters' requires_grad.
"""
from .adversarial_eval import ATTACKS, adversarial_accuracy
from .adversarial_losses import mart_loss, pgd_at_loss, trades_loss
from .attacks import NORMS, autoattack, cross_entropy_objective, fgsm, pgd
from .cc_cert import (cc_cert_batch, cc_cert_dataset, chernoff_cramer_bound, estimate_bound, official_bound,
                      prediction_discrepancy, top2_margin)
from .cifar10c_eval import evaluate_cifar10c
from .corruption_eval import evaluate_corruptions, mce, mean_corruption_accuracy
from .corruptions import CORRUPTION_GROUPS, CORRUPTIONS, corrupt
from .plots import plot_accuracy_vs_epsilon, plot_cc_cert, plot_certified_accuracy, plot_corruption_accuracy
from .semantic_transforms import DEFAULT_RANGES, TRANSFORMS, apply_transform, random_transform
from .smoothing import (ABSTAIN, certified_accuracy, certified_radius, certify, certify_dataset,
                        clopper_pearson_lower, largest_certified_radius, predict)

__all__ = [
    "CORRUPTIONS", "CORRUPTION_GROUPS", "corrupt", "evaluate_corruptions", "evaluate_cifar10c", "mean_corruption_accuracy", "mce",
    "NORMS", "pgd", "fgsm", "autoattack", "cross_entropy_objective", "ATTACKS", "adversarial_accuracy",
    "pgd_at_loss", "trades_loss", "mart_loss",
    "ABSTAIN", "clopper_pearson_lower", "certified_radius", "largest_certified_radius", "predict", "certify",
    "certify_dataset", "certified_accuracy",
    "TRANSFORMS", "DEFAULT_RANGES", "apply_transform", "random_transform",
    "top2_margin", "prediction_discrepancy", "chernoff_cramer_bound", "official_bound",
    "estimate_bound", "cc_cert_batch", "cc_cert_dataset",
    "plot_corruption_accuracy", "plot_certified_accuracy", "plot_accuracy_vs_epsilon", "plot_cc_cert",
]
