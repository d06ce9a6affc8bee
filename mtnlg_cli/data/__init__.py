"""Data: corpus readers, the SentencePiece tokenizer, Megatron-format indexed datasets and training samples."""
