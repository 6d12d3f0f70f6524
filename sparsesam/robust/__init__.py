"""Robustness: corruptions, attacks, certification."""
