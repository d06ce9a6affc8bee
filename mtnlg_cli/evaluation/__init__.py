"""Evaluation: scoring token spans for perplexity, cloze and multiple-choice tasks, and the lm-eval adapter."""
