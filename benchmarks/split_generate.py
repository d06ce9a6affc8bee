"""Generation with the model split over two CPU processes (TP=2, gloo) against one process, for
`python -m benchmarks generate`: greedy tokens/s at batch 1 and each process's peak memory.

The model is bench_generate's 23.6M-parameter GPT, saved as a checkpoint. Each round runs one process and then
two processes, each of one thread (`python -m torch.distributed.run`), each loading the checkpoint as the
commands do (`checkpoint.load_model`, `inference.parallel.load_split`) and generating from a 64-token prompt; the
rounds alternate, so drift on the shared machine reaches both alike. Memory is the growth of a process's peak
resident size while it loads the model (what it read of the checkpoint and kept), as VmHWM counts it.

The cost of the communication per token is estimated from its parts: a split GPT's decoding step makes two
all-reduces of one hidden vector per layer and one for the embedding, gathers the logits, and rank 0 broadcasts
the request; each rank times 200 all-reduces of one hidden vector before loading.

Run as a worker: `python -m torch.distributed.run --nproc_per_node=2 -m benchmarks.split_generate CKPT OUT N`
(or without the launcher for one process).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Result

PROMPT_TOKENS = 64


def _peak_bytes() -> int:
    """This process's peak resident size: VmHWM, not ru_maxrss, which Linux keeps across exec, so that a process
    started by a benchmark that had grown large would begin at that benchmark's peak."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024


def worker(checkpoint_dir: Path, out: Path, new_tokens: int) -> None:
    import torch
    import torch.distributed as dist

    from mtnlg_cli.checkpoint import load_model, resolve_checkpoint
    from mtnlg_cli.config import SamplingSettings, load_config
    from mtnlg_cli.inference.engine import Generator
    from mtnlg_cli.inference.parallel import load_split
    from mtnlg_cli.launch import exit_process, join_processes
    from benchmarks.bench_generate import SHAPE, _IdTokenizer

    import torch.distributed.tensor  # noqa: F401  (imported before the memory is measured: a fixed cost, not the
    import mtnlg_cli.training.plans  # noqa: F401  model's, which the figure is about)
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT

    checkpoint = resolve_checkpoint(checkpoint_dir)
    rank = int(os.environ.get("RANK", "0"))
    figures: dict = {}
    before = _peak_bytes()
    with torch.device("meta"):  # the meta device's first use loads torch's registrations for it: a fixed cost too
        GPT(Architecture.from_dict({**SHAPE, "num_layers": 1}))
    figures["meta_device_bytes"] = _peak_bytes() - before
    if "WORLD_SIZE" in os.environ:
        join_processes()
        vector = torch.zeros(1, 1, SHAPE["hidden_size"])
        for _ in range(20):
            dist.all_reduce(vector)
        start = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(vector)
        figures["all_reduce_s"] = (time.perf_counter() - start) / 200
        config = load_config({}, [f"parallel.tensor_parallel={dist.get_world_size()}"])
        before = _peak_bytes()
        model = load_split(checkpoint, config)  # the other ranks follow rank 0 until it closes the model
    else:
        before = _peak_bytes()
        model = load_model(checkpoint)
    figures["load_growth_bytes"] = _peak_bytes() - before  # (for a following rank: after rank 0 closed)
    figures["peak_bytes"] = _peak_bytes()
    if model is not None:
        generator = Generator(model, _IdTokenizer())
        ids = torch.randint(8, SHAPE["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
        settings = SamplingSettings(max_new_tokens=new_tokens, temperature=0.0)
        generator.generate(ids.tolist(), settings.replace(max_new_tokens=4), stop_token_ids=())  # warm-up
        start = time.perf_counter()
        tokens = generator.generate(ids.tolist(), settings, stop_token_ids=())[0].tokens
        figures["tokens_per_s"] = new_tokens / (time.perf_counter() - start)
        figures["tokens"] = tokens
        if hasattr(model, "close"):
            model.close()
    (out / f"rank{rank}.json").write_text(json.dumps(figures))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_process(0)


def _run(processes: int, checkpoint_dir: Path, new_tokens: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="mtnlg-split-bench-") as folder:
        # one thread per process: on a shared machine a process of two threads waits on the busier core (ten
        # times slower here), which would measure the machine, not the split
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    "-m"] if processes > 1 else [sys.executable, "-m"]
        subprocess.run([*launcher, "benchmarks.split_generate", str(checkpoint_dir), folder, str(new_tokens)],
                       env=env, check=True, cwd=Path(__file__).resolve().parents[1])
        return [json.loads((Path(folder) / f"rank{rank}.json").read_text()) for rank in range(processes)]


def results(quick: bool = False) -> list[Result]:
    import torch

    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT
    from benchmarks.bench_generate import SHAPE

    rounds, new_tokens = (1, 16) if quick else (3, 48)
    with tempfile.TemporaryDirectory(prefix="mtnlg-split-ckpt-") as folder:
        torch.manual_seed(0)
        model = GPT(Architecture.from_dict(SHAPE))
        save_checkpoint(Path(folder), 1, {"model": model.state_dict()}, {"model_config": model.config.to_dict()})
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        one, split = [], []
        for round_ in range(rounds):
            one.append(_run(1, Path(folder), new_tokens))
            split.append(_run(2, Path(folder), new_tokens))
            print(f"round {round_}: one process {one[-1][0]['tokens_per_s']:.1f} tokens/s, TP=2 "
                  f"{split[-1][0]['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    if any(s[0]["tokens"] != o[0]["tokens"] for s, o in zip(split, one)):
        raise AssertionError("TP=2 and one process disagree on greedy tokens")
    mib = 2 ** 20
    one_memory = [run[0]["load_growth_bytes"] / mib for run in one]
    rank_memory = [max(rank["load_growth_bytes"] for rank in run) / mib for run in split]
    all_reduce = statistics.median(rank["all_reduce_s"] for run in split for rank in run)
    collectives = 2 * SHAPE["num_layers"] + 1
    decode_ms = 1e3 / statistics.median(run[0]["tokens_per_s"] for run in split)
    note = (f"2 CPU processes (gloo) against 1, one thread each, {new_tokens} new tokens; "
            f"communication per token: {collectives} all-reduces of one hidden vector at "
            f"{1e6 * all_reduce:.0f} us each = {1e3 * collectives * all_reduce:.2f} ms of a {decode_ms:.1f} ms "
            "step, plus the logits' gather and rank 0's request")
    return [
        Result("greedy generate tokens/s, TP=2 over 2 CPU processes, batch 1", "tokens/s",
               [run[0]["tokens_per_s"] for run in split], [run[0]["tokens_per_s"] for run in one], "one process",
               notes=note),
        Result("peak memory growth per process loading the model, TP=2", "MiB", rank_memory, one_memory,
               "one process", goal="<= 0.6x one process (>= 1.67x here)", higher_is_better=False,
               notes=f"the larger of the two ranks; peak resident size (VmHWM) growth while loading, after the imports; whole "
               f"process peaks: TP=2 {statistics.median(max(r['peak_bytes'] for r in run) for run in split) / mib:.0f}"
               f" MiB per rank, one process {statistics.median(run[0]['peak_bytes'] for run in one) / mib:.0f} MiB;"
               f" the model's weights: {weight_bytes / mib:.0f} MiB; not counted: the imports and the meta device's "
               f"first use ({statistics.median(r['meta_device_bytes'] for run in split for r in run) / mib:.0f} MiB"
               ", on which a split rank builds its part of the model)"),
    ]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
