"""The model: its architecture description and the GPT module built from it.

Nothing here imports the CLI, the commands or the rest of the core.
"""
