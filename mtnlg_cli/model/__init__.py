"""The model core: the GPT model, parallel plans, trainer, generation and checkpoints.

Nothing here imports the CLI or the commands.
"""
