"""mtnlg: train, evaluate, generate with and convert GPT-style (Megatron-Turing NLG) language models."""

__version__ = "0.1.0"
