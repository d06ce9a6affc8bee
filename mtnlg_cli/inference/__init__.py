"""Inference: the generation engine, sampling, CPU decoding and chat sessions."""
