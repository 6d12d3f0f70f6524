"""Pruning criteria and masks."""
from .magnitude import SCOPES, global_sparsity, magnitude_prune
from .channel_criteria import CHANNEL_CRITERIA, TaylorAccumulator, accumulate_taylor, channel_l2_norms, channel_scores
from .channel import channel_mask, channel_prune, channel_sparsity, prune_channels
from .channel_graph import ChannelGates, coupled_channel_groups, gate_pruned_channels
from .compaction import CompactionReport, compact_channels
from .nm import is_nm_sparse, nm_mask, nm_prune
from .scores import (GRANULARITIES, ScoreMask, attach_scores, freeze_scores, hydra_score_init, score_mask,
                     score_parameters, score_shape)
from .score_to_mask import ScoreToMask, kept_count, top_k_by_threshold
from .schedules import GradualCubic, Iterative, OneShot, SparsitySchedule
from .bsr import BSR_NORMS, block_magnitude_mask, block_scores, bsr_magnitude_mask, bsr_scores

__all__ = [
    "SCOPES", "magnitude_prune", "global_sparsity",
    "CHANNEL_CRITERIA", "channel_l2_norms", "TaylorAccumulator", "accumulate_taylor", "channel_scores",
    "channel_mask", "prune_channels", "channel_prune", "channel_sparsity",
    "coupled_channel_groups", "gate_pruned_channels", "ChannelGates", "compact_channels", "CompactionReport",
    "nm_mask", "is_nm_sparse", "nm_prune",
    "GRANULARITIES", "hydra_score_init", "score_shape", "score_mask", "ScoreMask", "ScoreToMask", "kept_count",
    "top_k_by_threshold",
    "attach_scores", "score_parameters", "freeze_scores",
    "SparsitySchedule", "OneShot", "Iterative", "GradualCubic",
    "BSR_NORMS", "bsr_scores", "bsr_magnitude_mask", "block_scores", "block_magnitude_mask",
]
