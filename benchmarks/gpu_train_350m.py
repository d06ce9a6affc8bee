"""Training throughput and MFU of the gpt-350m preset on one GPU (bf16), through the trainer's own runtime.

    python -m benchmarks.gpu_train_350m [--steps 300] [--micro-batch 16] [--compile] [--json out.json]

Trains on random tokens (nothing to download) for `--steps` optimizer steps with the product's code path:
`make_runtime` (Accelerate, bf16 autocast), `forward_backward`, gradient clipping and fused AdamW. Reports
tokens/s over the steps after `--warmup`, and model FLOPs utilisation against two bf16 rates measured on the same
GPU: torch.mm on the model's own matrix shapes (what the trainer's MFU uses) and on 8192^3 squares (the peak
torch reaches). Goal: MFU >= 50 % (Megatron-LM reports 47 % on H100 for GPT models of this class).

Needs a CUDA GPU; CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_train_350m needs a CUDA GPU")
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.training.metrics import measure_matmul_rate
    from mtnlg_cli.training.runtime import make_runtime
    from mtnlg_cli.workspace import template_config

    config = template_config("gpt-350m", [
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * args.accumulation}",
        "train.mixed_precision=bf16",
        f"train.compile={str(args.compile).lower()}",
    ])
    torch.backends.cuda.matmul.allow_tf32 = True
    architecture = Architecture.from_model_config(config.model)
    seq = config.model.seq_length
    tokens_per_step = config.train.global_batch_size * seq

    runtime = make_runtime(config)
    torch.manual_seed(config.train.seed)
    model = runtime.build_model(architecture)
    runtime.build_optimizer()
    runtime.set_lr(config.train.lr)
    generator = torch.Generator().manual_seed(0)
    vocab = config.model.vocab_size

    def step() -> float:
        batch = torch.randint(0, vocab, (config.train.global_batch_size, seq + 1), generator=generator)
        loss = runtime.forward_backward(batch)
        runtime.clip_grad_norm(config.train.clip_grad)
        runtime.optimizer_step()
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    tokens_per_s = args.steps * tokens_per_step / seconds
    model_flops = architecture.training_flops(tokens_per_s, seq)
    shapes_rate = measure_matmul_rate(architecture.matmul_shapes(args.micro_batch * seq), "cuda",
                                      torch.bfloat16, trial_seconds=0.4)
    square_rate = measure_matmul_rate([(8192, 8192, 8192)], "cuda", torch.bfloat16, trial_seconds=0.4)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "micro_batch": args.micro_batch, "accumulation": args.accumulation, "seq_length": seq,
        "compile": args.compile, "steps": args.steps, "final_loss": loss,
        "tokens_per_s": round(tokens_per_s),
        "model_tflops": round(model_flops / 1e12, 1),
        "bf16_mm_tflops_model_shapes": round(shapes_rate / 1e12, 1),
        "bf16_mm_tflops_8192": round(square_rate / 1e12, 1),
        "mfu_vs_model_shapes": round(model_flops / shapes_rate, 3),
        "mfu_vs_8192": round(model_flops / square_rate, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    runtime.shutdown()
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
