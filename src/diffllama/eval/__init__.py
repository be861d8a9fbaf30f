"""Evaluations of what differential attention does (Ye et al., arXiv 2410.05258): perplexity, multi-needle
retrieval, attention allocation, activation outliers, quantisation robustness, in-context-learning order
robustness, and an lm-evaluation-harness model class. ``diffllama eval`` runs them (:mod:`diffllama.eval.runner`).
"""

from diffllama.eval.runner import DEFAULT_TASKS, TASKS, EvalSettings, evaluate, summary

__all__ = ["DEFAULT_TASKS", "TASKS", "EvalSettings", "evaluate", "summary"]
