"""Conversion speed: writing and reading a Hugging Face GPT-2 folder, against transformers doing the same.

1. Export: `export_weights(..., to="hf")` (relayout, safetensors, config files, staged folder, fsync) against
   `GPT2LMHeadModel.save_pretrained` of the same weights, each timed until its files are on disk (`os.sync()`):
   otherwise whichever runs second pays for the other's write-back, and transformers, which does not fsync,
   would leave its write-back to mtnlg. Goal: >= 0.8x transformers.
2. Import: `read_weights` (safetensors, shape checks, relayout to mtnlg's names) against
   `AutoModelForCausalLM.from_pretrained` of the same folder. Goal: >= 0.8x transformers.

Model: the gpt-125m template (124M parameters, 0.5 GB in fp32); --quick uses 4 of its 12 layers. Timed
alternately in one process; figures are MB of fp32 weights per second.

Run: python -m benchmarks.bench_convert [--quick]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Result, alternate, timed


def run(quick: bool = False) -> list[Result]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel

    from mtnlg_cli.convert import Weights, export_weights, read_weights
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.workspace import template_config

    model_config = template_config("gpt-125m", ["model.num_layers=4"] if quick else []).model
    config = Architecture.from_model_config(model_config)
    torch.manual_seed(0)
    model = GPT(config)
    weights = Weights(dict(model.state_dict()), config, model_config.vocab_size, 0)
    megabytes = sum(t.numel() * t.element_size() for t in weights.tensors.values()) / 1e6
    repeats = 2 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "mtnlg", Path(tmp) / "transformers"
        export_weights(weights, ours, "hf")
        # weights in memory, as ours are (from_pretrained maps the file, and writing from a mapped file is faster)
        hf = GPT2LMHeadModel(AutoConfig.from_pretrained(ours))
        hf.load_state_dict(AutoModelForCausalLM.from_pretrained(ours).state_dict())

        def save_ours() -> None:
            export_weights(weights, ours, "hf", force=True)
            os.sync()

        def save_theirs() -> None:
            shutil.rmtree(theirs, ignore_errors=True)
            hf.save_pretrained(theirs)
            os.sync()

        export = alternate(lambda: megabytes / timed(save_ours), lambda: megabytes / timed(save_theirs), repeats)
        load = alternate(lambda: megabytes / timed(lambda: read_weights(ours, "hf")),
                         lambda: megabytes / timed(lambda: AutoModelForCausalLM.from_pretrained(ours)), repeats)
    layers = f"{config.num_layers} layers, {megabytes:.0f} MB fp32"
    return [
        Result(f"export to Hugging Face ({layers})", "MB/s", export[0], export[1], "transformers save_pretrained",
               goal=">= 0.8x transformers"),
        Result(f"import from Hugging Face ({layers})", "MB/s", load[0], load[1], "transformers from_pretrained",
               goal=">= 0.8x transformers"),
    ]


if __name__ == "__main__":
    for result in run(quick="--quick" in sys.argv):
        print(f"{result.benchmark}: mtnlg {result.mtnlg_median:.0f} {result.unit} ({Result.spread(result.mtnlg)}), "
              f"{result.peer_name} {result.peer_median:.0f} {result.unit} ({Result.spread(result.peer)}), "
              f"ratio {result.ratio:.2f} (goal {result.goal})")
