"""One thin module per subcommand: parse options, find the workspace and config, call the core.

Modules here import torch and the rest of the core inside their functions, so that `mtnlg --help` stays fast.
"""
