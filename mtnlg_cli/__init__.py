"""mtnlg: train, evaluate, generate with and convert GPT-style (Megatron-Turing NLG) language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from mtnlg_cli import MegatronLM` loads the API on first use, so that the CLI's imports stay light
    if name == "MegatronLM":
        from mtnlg_cli.api import MegatronLM

        return MegatronLM
    raise AttributeError(f"module 'mtnlg_cli' has no attribute {name!r}")
