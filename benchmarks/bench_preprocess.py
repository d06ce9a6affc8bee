"""Preprocess speed and memory.

1. Encoding throughput of the whole `preprocess` pipeline (reading, splitting, encoding in 2 worker processes,
   writing .bin/.idx), once the tokenizer exists, against the limit: SentencePiece's own encode of the same
   documents on one thread, times the number of workers (its batch encode is itself multi-threaded, so the fair
   limit is one thread per core). Goal: >= 85 % of the limit. Timed alternately in one process. On a machine
   that other work keeps busy, the wall-clock figure mostly measures the cores we did not get, so the same
   runs also report tokens per CPU-second of the whole pipeline (main process + workers) against the encoder.
2. Peak memory (main process + workers) preprocessing a corpus 20x the sample against the sample itself, each in
   a fresh subprocess with the tokenizer already trained. Goal: within 1.5x.

Run: python -m benchmarks.bench_preprocess [--quick]
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Result, alternate

REPO = Path(__file__).resolve().parents[1]
ENGLISH = REPO / "tests" / "data" / "en_austen_pride_sense.txt"
SAMPLE = REPO / "mtnlg_cli" / "templates" / "sample"
WORKERS = 2

_MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from mtnlg_cli.workspace import Workspace
from mtnlg_cli.data.preprocess import preprocess
ws = Workspace(Path(sys.argv[1]))
preprocess(ws, ws.load_config(), workers=int(sys.argv[2]))
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the benchmark that started us.
main_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"main_kib": main_kib, "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _workspace(root: Path, copies: int, tokenizer_from: Path | None = None):
    """A tiny-template workspace whose data/raw holds `copies` copies of each sample file."""
    from mtnlg_cli.workspace import init_workspace

    ws = init_workspace(root)
    for item in list(ws.raw_dir.iterdir()):
        if item.suffix == ".txt":
            for i in range(copies):
                (ws.raw_dir / f"{item.stem}_{i:03d}.txt").write_bytes(item.read_bytes())
        item.unlink()
    if tokenizer_from is not None:
        ws.tokenizer_dir.mkdir(parents=True, exist_ok=True)
        (ws.tokenizer_dir / "tokenizer.model").write_bytes(tokenizer_from.read_bytes())
    return ws


def throughput(quick: bool) -> list[Result]:
    from mtnlg_cli.data.preprocess import preprocess
    from mtnlg_cli.data.tokenizer import Tokenizer, train_tokenizer
    from mtnlg_cli.workspace import init_workspace

    copies = 2 if quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = ENGLISH.read_text(encoding="utf-8")
        tokenizer = train_tokenizer([l for l in text.split("\n") if l], tmp / "tok", 4000)
        ws = init_workspace(tmp / "ws")
        for item in ws.raw_dir.iterdir():
            item.unlink()
        for i in range(copies):
            (ws.raw_dir / f"en_{i}.txt").write_text(text, encoding="utf-8")
        config = ws.load_config([f"tokenizer.model_file={tokenizer.path}"])
        docs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()] * copies
        sp = Tokenizer.load(tokenizer.path).sp

        cpu = {"mtnlg": [], "peer": []}

        def ours() -> float:
            start, before = time.perf_counter(), _cpu_seconds()
            (result,) = preprocess(ws, config, workers=WORKERS, force=True)
            wall = time.perf_counter() - start
            cpu["mtnlg"].append(result.tokens / (_cpu_seconds() - before))
            return result.tokens / wall

        def limit() -> float:
            start, before = time.perf_counter(), _cpu_seconds()
            ids = sp.encode(docs, num_threads=1)
            tokens = sum(map(len, ids)) + len(ids)  # + the eos each document gets
            wall = time.perf_counter() - start
            cpu["peer"].append(tokens / (_cpu_seconds() - before))
            return WORKERS * tokens / wall

        mtnlg, peer = alternate(ours, limit, repeats=2 if quick else 5)
    name = f"English x{copies} ({copies * 1.36:.1f} MB), vocab 4000"
    return [Result(f"preprocess tokens/s, {WORKERS} workers, {name}", "tokens/s", mtnlg, peer,
                   f"SentencePiece encode num_threads=1 x {WORKERS}", ">= 0.85x the limit"),
            Result(f"preprocess tokens per CPU-second (main + workers), {name}", "tokens/CPU-s",
                   cpu["mtnlg"][-len(mtnlg):], cpu["peer"][-len(peer):], "SentencePiece encode num_threads=1",
                   ">= 0.85x", notes="insensitive to other load on the machine, unlike wall-clock rates")]


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers, once it has closed)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def memory(quick: bool) -> Result:
    from mtnlg_cli.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = "".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt")))
        model = train_tokenizer([l for l in text.split("\n") if l], tmp / "tok", 4000).path
        peaks = {}
        for copies in (1, 20):
            ws = _workspace(tmp / f"ws{copies}", copies, model)
            out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(ws.root), str(WORKERS)], check=True,
                                 capture_output=True, text=True, cwd=REPO).stdout
            probe = json.loads(out.strip().splitlines()[-1])
            peaks[copies] = (probe["main_kib"] + WORKERS * probe["worker_kib"]) / 1024
    return Result("peak RSS (main + workers), sample x20 vs sample x1", "MiB", [peaks[20]], [peaks[1]],
                  "the sample corpus (x1)", "<= 1.5x the sample's", higher_is_better=False,
                  notes="workers counted at the largest worker's peak")


def run(quick: bool = False) -> list[Result]:
    return [memory(quick), *throughput(quick)]


if __name__ == "__main__":
    for result in run(quick="--quick" in sys.argv):
        ratio = result.ratio
        print(f"{result.benchmark}: mtnlg {result.mtnlg_median:,.0f} {result.unit} ({Result.spread(result.mtnlg)}), "
              f"{result.peer_name} {result.peer_median:,.0f} ({Result.spread(result.peer)}); "
              f"mtnlg/peer {result.mtnlg_median / result.peer_median:.2f} (goal {result.goal}; "
              f"better-is-1+ ratio {ratio:.2f}) {result.notes}")
