"""Sliding-window perplexity speed: `mtnlg eval`'s scoring against transformers' documented recipe.

The 23.6M-parameter fp32 GPT of bench_generate (6 layers, hidden 512, 8 heads, vocabulary 8192) with random
weights; transformers gets the very same weights in a GPT2LMHeadModel. Both score one long document of random
token ids with windows of 256 tokens every 128 (each token scored once, with at least 128 tokens of context):

- mtnlg: `evaluation.document_logprobs` (all windows, batches of 8);
- transformers: the loop of its "Perplexity of fixed-length models" guide: one window at a time,
  `model(input_ids, labels=...)` with the already-scored tokens masked to -100.

The two totals are checked to agree (same windows, same tokens scored) before anything is timed. Figures are
scored tokens per second, measured alternately in one process.
"""

from __future__ import annotations

import torch

from benchmarks.bench_generate import SHAPE, gpt2_with_same_weights
from benchmarks.common import Result, alternate, timed

CONTEXT, STRIDE, BATCH = 256, 128, 8


def transformers_nll(peer, tokens: list[int], prefix: int) -> float:
    """Total negative log-likelihood of `tokens` after `prefix` by the transformers guide's sliding window."""
    full = torch.tensor([[prefix, *tokens]])
    n, total, scored_until = len(tokens), 0.0, 0
    for begin in range(0, n, STRIDE):
        end = min(begin + CONTEXT, n)
        inputs = full[:, begin:end + 1].clone()
        labels = inputs.clone()
        labels[:, :scored_until + 1 - begin] = -100  # tokens an earlier window scored
        with torch.no_grad():
            loss = peer(inputs, labels=labels).loss  # mean over the scored tokens
        total += float(loss) * int((labels[:, 1:] != -100).sum())
        scored_until = end
        if end == n:
            break
    return total


def run(quick: bool = False) -> list[Result]:
    from mtnlg_cli.evaluation.scoring import document_logprobs
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.model.architecture import Architecture

    torch.manual_seed(0)
    model = GPT(Architecture.from_dict(SHAPE)).eval()
    peer = gpt2_with_same_weights(model)
    tokens = torch.randint(4, SHAPE["vocab_size"], (512 if quick else 2048,)).tolist()

    def ours() -> float:
        return -float(document_logprobs(model, [tokens], 3, CONTEXT, STRIDE, BATCH)[0])

    reference, check = ours(), transformers_nll(peer, tokens, 3)
    assert abs(reference - check) < 1e-4 * abs(check), (reference, check)
    mtnlg_rate, peer_rate = alternate(lambda: len(tokens) / timed(ours),
                                      lambda: len(tokens) / timed(lambda: transformers_nll(peer, tokens, 3)),
                                      repeats=1 if quick else 3)
    return [Result(f"eval sliding-window scoring ({CONTEXT}-token windows every {STRIDE}, fp32, "
                   f"{torch.get_num_threads()} threads)", "tokens/s", mtnlg_rate, peer_rate,
                   peer_name="transformers perplexity guide", goal=">= 1x transformers",
                   notes=f"{len(tokens)} tokens; totals agree to 1e-4")]


if __name__ == "__main__":
    for result in run():
        print(f"{result.benchmark}: mtnlg {result.mtnlg_median:,.0f} {result.unit} ({Result.spread(result.mtnlg)}), "
              f"{result.peer_name} {result.peer_median:,.0f} ({Result.spread(result.peer)}), "
              f"ratio {result.ratio:.2f}x")
