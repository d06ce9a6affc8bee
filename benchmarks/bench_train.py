"""Training tokens/s at the bench config against transformers, and MFU against torch's matmul rate.

Bench config: 6 layers, hidden 512, 8 heads, sequence 256, vocabulary 8192, batch 8, fp32, no dropout, in two
families: GPT (against transformers' GPT2LMHeadModel) and Llama-style (rotary positions, RMSNorm, SwiGLU with
ffn 1408, 2 query groups, untied head, no biases; against transformers' LlamaForCausalLM of the same shape). mtnlg
trains through the trainer's own step (`Runtime`: forward and backward, gradient clipping, fused AdamW);
transformers' model gets the same optimizer and clipping. The two alternate in this process, and every round also
measures torch's matmul rate on the model's own matrix shapes, so MFU is relative to what this machine does now.

    python -m benchmarks.bench_train
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import Result, alternate

LAYERS, HIDDEN, HEADS, SEQ, VOCAB, BATCH = 6, 512, 8, 256, 8192, 8
LLAMA_FFN, LLAMA_GROUPS = 1408, 2
LLAMA = {"position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True,
         "ffn_hidden_size": LLAMA_FFN, "num_query_groups": LLAMA_GROUPS,
         "untie_embeddings_and_output_weights": True, "add_bias_linear": False}


def mtnlg_trainer_step(family: dict):
    from mtnlg_cli.config import load_config
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.training.runtime import make_runtime

    config = load_config({
        "model": {"num_layers": LAYERS, "hidden_size": HIDDEN, "num_heads": HEADS, "seq_length": SEQ,
                  "max_position_embeddings": SEQ, "vocab_size": VOCAB, **family},
        "train": {"micro_batch_size": BATCH, "global_batch_size": BATCH},
    })
    architecture = Architecture.from_model_config(config.model)
    runtime = make_runtime(config)
    runtime.build_model(architecture)
    runtime.build_optimizer()
    batch = torch.randint(0, VOCAB, (BATCH, SEQ + 1))

    def step() -> None:
        runtime.forward_backward(batch)
        runtime.clip_grad_norm(1.0)
        runtime.optimizer_step()

    return step, architecture


def transformers_model(family: dict):
    """transformers' model of the same shape as mtnlg's of `family` (the GPT one, or LLAMA)."""
    if not family:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS,
                                          n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=2, eos_token_id=3, attn_implementation="sdpa"))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=LLAMA_FFN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=LLAMA_GROUPS, max_position_embeddings=SEQ,
                                        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                                        mlp_bias=False, bos_token_id=2, eos_token_id=3,
                                        attn_implementation="sdpa"))


def transformers_step(family: dict):
    model = transformers_model(family).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(quick: bool = False) -> list[Result]:
    return family_results({}, "GPT", "transformers GPT2LMHeadModel", quick) + \
        family_results(LLAMA, "Llama-style", "transformers LlamaForCausalLM", quick)


def family_results(family: dict, label: str, peer_name: str, quick: bool) -> list[Result]:
    from mtnlg_cli.training.metrics import measure_matmul_rate

    ours, architecture = mtnlg_trainer_step(family)
    theirs = transformers_step(family)
    steps = 1 if quick else 2
    tokens = steps * BATCH * SEQ
    shapes = architecture.matmul_shapes(BATCH * SEQ)
    flops = architecture.training_flops(tokens, SEQ)
    matmul_rates, mfu_ours, mfu_theirs = [], [], []

    def tokens_per_s(step, mfu: list[float]):
        def measure() -> float:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds = time.perf_counter() - start
            mfu.append(flops / seconds)  # divided by this round's matmul rate below
            return tokens / seconds
        return measure

    def round_with_matmul_rate():
        matmul_rates.append(measure_matmul_rate(shapes, trial_seconds=0.1 if quick else 0.2))

    measure_ours, measure_theirs = tokens_per_s(ours, mfu_ours), tokens_per_s(theirs, mfu_theirs)

    def ours_then_matmul() -> float:
        figure = measure_ours()
        round_with_matmul_rate()
        return figure

    ours_figures, their_figures = alternate(ours_then_matmul, measure_theirs, repeats=2 if quick else 5)
    # warm-up rounds are discarded by alternate(); keep the figures of the measured rounds only
    rounds = len(ours_figures)
    rates = matmul_rates[-rounds:]
    mfu_ours = [f / r for f, r in zip(mfu_ours[-rounds:], rates)]
    mfu_theirs = [f / r for f, r in zip(mfu_theirs[-rounds:], rates)]
    notes = (f"torch matmul rate on the model's shapes: {statistics.median(rates) / 1e9:.0f} GFLOP/s (median); "
             f"{torch.get_num_threads()} threads")
    shape = "6L h512 seq256 V8192 b8 fp32"
    if family:
        shape += f", ffn {LLAMA_FFN} SwiGLU, {LLAMA_GROUPS} query groups"
    return [
        Result(f"train tokens/s, {label} ({shape})", "tokens/s", ours_figures, their_figures,
               peer_name=peer_name, goal=">= 1.2x transformers", notes=notes),
        Result(f"train MFU vs torch matmul on the same shapes, {label}", "fraction", mfu_ours, mfu_theirs,
               peer_name=peer_name, goal=">= 0.85" if family else ">= 0.90", notes=notes),
    ]


if __name__ == "__main__":
    for result in run():
        peer = f"{result.peer_median:,.3f}" if result.peer else "-"
        print(f"{result.benchmark}: mtnlg {result.mtnlg_median:,.3f} {Result.spread(result.mtnlg)}, "
              f"{result.peer_name} {peer} {Result.spread(result.peer or [])}, ratio {result.ratio:.2f}x "
              f"(goal {result.goal}); {result.notes}")
