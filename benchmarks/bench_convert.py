"""Conversion speed: writing and reading a Hugging Face GPT-2 folder, against transformers doing the same.

1. Export: `export_weights(..., to="hf")` (relayout, safetensors, config files, staged folder, fsync) against
   `GPT2LMHeadModel.save_pretrained` of the same weights, each timed until its files are on disk (`os.sync()`):
   otherwise whichever runs second pays for the other's write-back, and transformers, which does not fsync,
   would leave its write-back to mtnlg. Goal: >= 0.8x transformers.
2. Import: `read_weights` (safetensors, shape checks, relayout to mtnlg's names) against
   `AutoModelForCausalLM.from_pretrained` of the same folder. Goal: >= 0.8x transformers.
3. A workspace from the folder, `mtnlg init --from` (every check, the tokenizer, the weights streamed tensor by
   tensor into checkpoint step 0, fsync), against `AutoModelForCausalLM.from_pretrained`, each in a fresh process:
   seconds (goal >= 1x transformers), and the peak memory above the process's baseline (after its imports) in
   units of the model's fp32 size (goal < 1.3).

Model: the gpt-125m template (124M parameters, 0.5 GB in fp32); --quick uses 4 of its 12 layers. Timed
alternately (1 and 2 in one process); figures are MB of fp32 weights per second.

Run: python -m benchmarks.bench_convert [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
        pretrained = Path(tmp) / "pretrained"
        hf.save_pretrained(pretrained)
        _save_tokenizer(pretrained, model_config.vocab_size)
        runs = {"mtnlg": [], "transformers": []}
        for _ in range(repeats):
            for who in runs:
                runs[who].append(_in_fresh_process(who, pretrained, Path(tmp) / "ws"))
    layers = f"{config.num_layers} layers, {megabytes:.0f} MB fp32"
    peak = {who: [r["peak_bytes"] / (megabytes * 1e6) for r in measured] for who, measured in runs.items()}
    return [
        Result(f"export to Hugging Face ({layers})", "MB/s", export[0], export[1], "transformers save_pretrained",
               goal=">= 0.8x transformers"),
        Result(f"import from Hugging Face ({layers})", "MB/s", load[0], load[1], "transformers from_pretrained",
               goal=">= 0.8x transformers"),
        Result(f"mtnlg init --from a Hugging Face folder ({layers})", "s", [r["seconds"] for r in runs["mtnlg"]],
               [r["seconds"] for r in runs["transformers"]], "transformers from_pretrained",
               goal=">= 1x transformers", higher_is_better=False,
               notes="each in a fresh process; mtnlg writes a workspace and a checkpoint, transformers loads"),
        Result(f"init --from peak memory above baseline ({layers})", "x model", peak["mtnlg"], peak["transformers"],
               "transformers from_pretrained", goal="< 1.3x the model (mtnlg)", higher_is_better=False,
               notes="VmHWM minus the RSS after imports, over the fp32 model size"),
    ]


_CHILD = """
import json, sys, time
from pathlib import Path
who, source, target = sys.argv[1:]
if who == "mtnlg":
    import torch, tokenizers, safetensors
    from mtnlg_cli.convert.pretrained import create_from_pretrained
    run = lambda: create_from_pretrained(Path(target), source)
else:
    import torch
    from transformers import AutoModelForCausalLM
    run = lambda: AutoModelForCausalLM.from_pretrained(source)
def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) * 1024
baseline = rss("VmRSS:")
started = time.perf_counter()
run()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_bytes": rss("VmHWM:") - baseline}))
"""


def _in_fresh_process(who: str, source: Path, target: Path) -> dict:
    """Seconds and peak memory (above the baseline after imports) of one import in a new interpreter."""
    shutil.rmtree(target, ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", _CHILD, who, str(source), str(target)], capture_output=True,
                          text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    shutil.rmtree(target, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE of the model's vocabulary size (the import needs the model's own tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {**{c: i for i, c in enumerate(sorted(alphabet))},
             **{f"<unused_{i}>": i for i in range(len(alphabet), vocab_size - 1)}, "<|endoftext|>": vocab_size - 1}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


if __name__ == "__main__":
    for result in run(quick="--quick" in sys.argv):
        print(f"{result.benchmark}: mtnlg {result.mtnlg_median:.0f} {result.unit} ({Result.spread(result.mtnlg)}), "
              f"{result.peer_name} {result.peer_median:.0f} {result.unit} ({Result.spread(result.peer)}), "
              f"ratio {result.ratio:.2f} (goal {result.goal})")
