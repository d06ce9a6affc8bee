"""Fine-tuning: the share of padding with and without packing on the test data, and LoRA against full fine-tuning
of the same model (tokens/s, gradient and optimizer memory, peak memory).

Data: summarization pairs made from the shared test corpora (`tests/data`: each paragraph of two sentences or more
is a document, its first sentence the summary), read by `mtnlg finetune`'s reader, rendered in the role-token chat
format of a SentencePiece tokenizer trained on the same text, and laid out in rows of 256 tokens with and without
packing (the examples longer than a row are left out, as `mtnlg finetune` refuses them).

Model: the train benchmark's (6 layers, hidden 512, 8 heads, sequence 256, vocabulary 8192, batch 8, fp32). Both
methods take the trainer's own step (`Runtime`: forward and backward on packed rows, clipping, fused AdamW) and
alternate in this process; LoRA has rank 8 on every linear layer of the blocks. Gradient and optimizer memory is
counted from the tensors after a step; peak memory is measured in a fresh process per method (the accelerator's peak
allocation, or on a CPU the rise of the process's peak resident size over its size once torch is imported).

    python -m benchmarks finetune [--quick]
"""

from __future__ import annotations

import json
import multiprocessing
import re
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Result, alternate

REPO = Path(__file__).resolve().parents[1]
CORPORA = [REPO / "tests/data/en_austen_pride_sense.txt", REPO / "tests/data/zh_poems_and_debian_faq.txt"]
LAYERS, HIDDEN, HEADS, SEQ, VOCAB, BATCH, RANK = 6, 512, 8, 256, 8192, 8, 8
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s*")


def summarization_pairs(limit: int) -> list[dict]:
    pairs = []
    for corpus in CORPORA:
        for paragraph in corpus.read_text(encoding="utf-8").split("\n\n"):
            text = " ".join(paragraph.split())
            sentences = [s for s in _SENTENCE_END.split(text) if s]
            if len(sentences) >= 2:
                pairs.append({"document": text, "summary": sentences[0]})
    return pairs[:limit]


def rendered_examples(folder: Path, limit: int):
    """(examples rendered in the role-token format, how many were longer than a row, the tokenizer's pad id)."""
    from mtnlg_cli.data.tokenizer import train_tokenizer
    from mtnlg_cli.finetune.examples import BadLines, read_examples
    from mtnlg_cli.finetune.render import render_example
    from mtnlg_cli.finetune.trainer import DEFAULT_SUMMARIZE_STYLE

    lines = [line for corpus in CORPORA for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = train_tokenizer(lines, folder / "tokenizer", vocab_size=4000)
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in summarization_pairs(limit)),
                    encoding="utf-8")
    rendered = [render_example(tokenizer, list(example.messages))
                for example in read_examples(data, DEFAULT_SUMMARIZE_STYLE, BadLines())]
    fitting = [example for example in rendered if len(example) - 1 <= SEQ]
    return fitting, len(rendered) - len(fitting), tokenizer.pad_id


def padding_results(quick: bool) -> tuple[list[Result], object]:
    from mtnlg_cli.finetune.rows import ExampleRows

    with tempfile.TemporaryDirectory() as folder:
        examples, too_long, pad_id = rendered_examples(Path(folder), 600 if quick else 3000)
    packed = ExampleRows(examples, SEQ, packing=True, seed=0, pad_id=pad_id)
    unpacked = ExampleRows(examples, SEQ, packing=False, seed=0, pad_id=pad_id)
    notes = (f"{len(examples):,} summarization pairs from tests/data ({too_long} longer than {SEQ} tokens left "
             f"out): {len(packed):,} packed rows against {len(unpacked):,}")
    results = [Result(f"finetune padding share, rows of {SEQ} (packed; peer: one example per row)", "fraction",
                      [packed.padding_share], [unpacked.padding_share], peer_name="no packing",
                      higher_is_better=False, notes=notes)]
    return results, packed


def runtime_for(method: str):
    from mtnlg_cli.config import load_config
    from mtnlg_cli.finetune.lora import LoraSettings, add_adapters
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.training.runtime import make_runtime

    config = load_config({
        "model": {"num_layers": LAYERS, "hidden_size": HIDDEN, "num_heads": HEADS, "seq_length": SEQ,
                  "max_position_embeddings": SEQ, "vocab_size": VOCAB},
        "train": {"micro_batch_size": BATCH, "global_batch_size": BATCH},
        "finetune": {"method": method, "lora_rank": RANK},
    })
    architecture = Architecture.from_model_config(config.model)
    runtime = make_runtime(config)
    lora = LoraSettings.from_config(config.finetune, architecture) if method == "lora" else None
    runtime.build_model(architecture, (lambda model: add_adapters(model, lora)) if lora else None)
    runtime.build_optimizer()
    return runtime


def training_step(runtime, rows, first: int) -> None:
    samples = list(range(first, first + BATCH))
    runtime.forward_backward(rows.batch(samples, rows.counted_targets(samples)))
    runtime.clip_grad_norm(1.0)
    runtime.optimizer_step()


def gradient_and_optimizer_bytes(runtime) -> int:
    """What training keeps beside the weights: a gradient per trained parameter and the optimizer's state."""
    trained = [p for p in runtime.model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trained)
    state = sum(t.numel() * t.element_size() for s in runtime.optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return gradients + state


def resident_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def peak_memory_of(method: str, rows, connection) -> None:
    """In a fresh process: the peak memory of building `method`'s model and optimizer and taking two steps, above
    what the process held before (torch imported)."""
    from mtnlg_cli.training.runtime import make_runtime  # noqa: F401  (imported before the baseline)

    Path("/proc/self/clear_refs").write_text("5")  # the peak resident size restarts from the current one
    baseline = resident_kib("VmRSS")
    runtime = runtime_for(method)
    for step in range(2):
        training_step(runtime, rows, step * BATCH)
    if runtime.device.type == "cuda":
        connection.send(torch.cuda.max_memory_allocated(runtime.device))
    else:
        connection.send((resident_kib("VmHWM") - baseline) * 1024)


def peak_memory(method: str, rows) -> int:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=peak_memory_of, args=(method, rows, sender))
    process.start()
    figure = receiver.recv()
    process.join()
    return figure


def lora_results(rows, quick: bool) -> list[Result]:
    full, lora = runtime_for("full"), runtime_for("lora")
    steps = 1 if quick else 3
    consumed = {"full": 0, "lora": 0}

    def tokens_per_s(runtime, method: str):
        def measure() -> float:
            start = time.perf_counter()
            for _ in range(steps):
                training_step(runtime, rows, consumed[method])
                consumed[method] += BATCH
            return steps * BATCH * SEQ / (time.perf_counter() - start)
        return measure

    lora_speed, full_speed = alternate(tokens_per_s(lora, "lora"), tokens_per_s(full, "full"),
                                       repeats=2 if quick else 5)
    lora_bytes, full_bytes = gradient_and_optimizer_bytes(lora), gradient_and_optimizer_bytes(full)
    trained = sum(p.numel() for p in lora.model.parameters() if p.requires_grad)
    del full, lora
    peaks = {method: peak_memory(method, rows) for method in ("lora", "full")}
    model = f"{LAYERS}L h{HIDDEN} seq{SEQ} V{VOCAB} b{BATCH} fp32, rank {RANK}"
    return [
        Result(f"finetune tokens/s, LoRA vs full ({model})", "tokens/s", lora_speed, full_speed,
               peer_name="full fine-tuning", notes="packed summarization rows"),
        Result(f"finetune gradient + optimizer memory, LoRA vs full ({model})", "MiB", [lora_bytes / 2**20],
               [full_bytes / 2**20], peer_name="full fine-tuning", higher_is_better=False,
               goal="LoRA < 5% of full", notes=f"LoRA: {lora_bytes / full_bytes:.2%} of full; {trained:,} trained "
                                               "parameters"),
        Result(f"finetune peak memory, LoRA vs full ({model})", "MiB", [peaks["lora"] / 2**20],
               [peaks["full"] / 2**20], peer_name="full fine-tuning", higher_is_better=False,
               notes="accelerator peak allocation" if torch.cuda.is_available()
               else "peak resident size of a fresh process, above its size once torch is imported"),
    ]


def run(quick: bool = False) -> list[Result]:
    results, packed_rows = padding_results(quick)
    return results + lora_results(packed_rows, quick)


if __name__ == "__main__":
    for result in run():
        peer = f"{result.peer_median:,.3f}" if result.peer else "-"
        print(f"{result.benchmark}: mtnlg {result.mtnlg_median:,.3f}, {result.peer_name} {peer}, "
              f"ratio {result.ratio:.2f}x; {result.notes}")
