"""Greedy decoding speed: mtnlg's engine against transformers' `generate()` and against the matrix-vector limit.

Two fp32 models with random weights, 6 layers, hidden 512, 8 heads, vocabulary 8192, 1024 positions:
- GPT (23.6M parameters): transformers gets the very same weights in a GPT2LMHeadModel;
- Llama-style (25.3M parameters: rotary positions, RMSNorm, SwiGLU with ffn 1408, 2 query groups, untied head,
  no biases): transformers gets the very same weights in a LlamaForCausalLM.
Each is checked first (equal logits and equal greedy tokens). Everything runs in one process, alternating, with
the same thread count; for each family:

- tokens/s of `generate` from a 64-token prompt at batch 1 and batch 8 (prompt processing included), mtnlg
  against transformers;
- decode time per token (the median time between successive new tokens, so the prompt's cost is left out) at
  batch 1, against the limit: one matrix-vector product through every weight matrix per token, each timed the
  fastest of four ways (MKL on either layout, oneDNN on its blocked one, mtnlg's own C product on huge pages;
  SwiGLU's gate and up are two products here, one in mtnlg's step).
  Each decode is timed right after a limit, twelve pairs a round (four with --quick): the machine's speed drifts
  by more than the gap between the two, so besides the ratio of medians the note gives the median of each decode
  over its own limit;
- decode time per token at 64 and at 1,000 tokens of context, mtnlg against transformers;
- weight-only quantization on a gpt-125m-shaped model (12 layers, hidden 768, ffn 3072, vocabulary 50,304, random
  weights): batch-1 decode tokens/s of fp32, int8 and int4 (groups of 32), each against its own limit (the time to
  read that format's weight bytes once, timed right before), and batch-8 decode tokens/s of int8 against fp32;
- the model split over two CPU processes (TP=2) against one process: tokens/s, peak memory per process and the
  communication per token (`split_generate.py`).
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import Result, timed
from mtnlg_cli.inference import native

SHAPE = dict(vocab_size=8192, max_position_embeddings=1024, num_layers=6, hidden_size=512, num_heads=8,
             ffn_hidden_size=2048)
LLAMA_SHAPE = dict(SHAPE, position_embedding_type="rope", normalization="RMSNorm", swiglu=True, ffn_hidden_size=1408,
                   num_query_groups=2, untie_embeddings_and_output_weights=True, add_bias_linear=False)
GPT_125M_SHAPE = dict(vocab_size=50304, max_position_embeddings=1024, num_layers=12, hidden_size=768, num_heads=12,
                      ffn_hidden_size=3072)


class _IdTokenizer:
    """Just what the engine asks of a tokenizer, for a model whose ids mean nothing."""

    pad_id, eos_id = 0, 3
    eos_ids, never_sampled = (eos_id,), (pad_id,)

    def __init__(self, vocab_size: int = SHAPE["vocab_size"]):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("the benchmark passes token ids")

    def decode_bytes(self, ids) -> bytes:
        return " ".join(map(str, ids)).encode()


class _TokenClock:
    """Notes when each token arrives: transformers calls `put` (its streamer interface), mtnlg calls the clock
    (as `on_text`) once per new token. The first `skip` arrivals are left out."""

    def __init__(self, skip: int):
        self.skip = skip
        self.arrivals: list[float] = []

    def put(self, _tokens) -> None:
        self.arrivals.append(time.perf_counter())

    def end(self) -> None:
        pass

    def __call__(self, _row: int, _text: str) -> None:
        self.put(None)

    def median_interval(self) -> float:
        tokens = self.arrivals[self.skip:]
        return statistics.median(b - a for a, b in zip(tokens, tokens[1:]))


def gpt2_with_same_weights(model):
    """A transformers GPT2LMHeadModel computing what `model` computes.

    GPT-2's c_attn is a Conv1D ([in, out] weight) whose outputs are all q, then all k, then all v; ours is a
    Linear ([out, in]) whose rows are per head q, k, v. GPT-2's "gelu_new" is GeLU's tanh approximation.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_position_embeddings, n_embd=c.hidden_size,
                        n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.ffn_hidden_size,
                        activation_function="gelu_new", layer_norm_epsilon=c.norm_epsilon, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None,
                        eos_token_id=None, pad_token_id=0)
    peer = GPT2LMHeadModel(config).eval()
    ours = model.state_dict()

    def heads_last(t: torch.Tensor) -> torch.Tensor:  # [head, q|k|v, head_dim, ...] -> [q|k|v, head, head_dim, ...]
        return t.view(c.num_heads, 3, c.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    theirs = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"],
              "transformer.ln_f.weight": ours["ln_f.weight"], "transformer.ln_f.bias": ours["ln_f.bias"],
              "lm_head.weight": ours["wte.weight"]}
    for i in range(c.num_layers):
        a, b = f"layers.{i}.", f"transformer.h.{i}."
        theirs.update({
            b + "ln_1.weight": ours[a + "ln_1.weight"], b + "ln_1.bias": ours[a + "ln_1.bias"],
            b + "ln_2.weight": ours[a + "ln_2.weight"], b + "ln_2.bias": ours[a + "ln_2.bias"],
            b + "attn.c_attn.weight": heads_last(ours[a + "attn.qkv.weight"]).t(),
            b + "attn.c_attn.bias": heads_last(ours[a + "attn.qkv.bias"]),
            b + "attn.c_proj.weight": ours[a + "attn.proj.weight"].t(), b + "attn.c_proj.bias": ours[a + "attn.proj.bias"],
            b + "mlp.c_fc.weight": ours[a + "mlp.fc.weight"].t(), b + "mlp.c_fc.bias": ours[a + "mlp.fc.bias"],
            b + "mlp.c_proj.weight": ours[a + "mlp.proj.weight"].t(), b + "mlp.c_proj.bias": ours[a + "mlp.proj.bias"],
        })
    peer.load_state_dict({k: v.contiguous() for k, v in theirs.items()}, strict=False)
    return peer


def llama_with_same_weights(model):
    """A transformers LlamaForCausalLM computing what `model` (rotary, RMSNorm, SwiGLU, untied, no biases)
    computes: q, k and v come out of our fused qkv, whose rows are [group, (its q heads | k | v), head_dim]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.query_groups, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.norm_epsilon, rope_theta=c.rotary_base, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0)
    peer = LlamaForCausalLM(config).eval()
    ours = model.state_dict()
    per_group = c.num_heads // c.query_groups
    theirs = {"model.embed_tokens.weight": ours["wte.weight"], "model.norm.weight": ours["ln_f.weight"],
              "lm_head.weight": ours["lm_head.weight"]}
    for i in range(c.num_layers):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        qkv = ours[a + "attn.qkv.weight"].view(c.query_groups, per_group + 2, c.head_dim, c.hidden_size)
        theirs.update({
            b + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(-1, c.hidden_size),
            b + "self_attn.k_proj.weight": qkv[:, per_group].reshape(-1, c.hidden_size),
            b + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(-1, c.hidden_size),
            b + "self_attn.o_proj.weight": ours[a + "attn.proj.weight"],
            b + "mlp.gate_proj.weight": ours[a + "mlp.gate.weight"],
            b + "mlp.up_proj.weight": ours[a + "mlp.fc.weight"],
            b + "mlp.down_proj.weight": ours[a + "mlp.proj.weight"],
            b + "input_layernorm.weight": ours[a + "ln_1.weight"],
            b + "post_attention_layernorm.weight": ours[a + "ln_2.weight"],
        })
    missing, unexpected = peer.load_state_dict({k: v.contiguous() for k, v in theirs.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return peer


def multiplied_weights(model) -> list[torch.Tensor]:
    """The weight matrices one token multiplies by: all but the position table, and the embedding table only as a
    tied head (an untied model looks its rows up)."""
    looked_up = {"wpe.weight"} | ({"wte.weight"} if model.lm_head is not None else set())
    return [p.detach() for name, p in model.named_parameters() if p.dim() == 2 and name not in looked_up]


def matvec_limit(model):
    """Two functions timing one matrix-vector product through every weight matrix (the tied head once): the time a
    decoded token cannot beat when the weights stream from memory. In the first, each weight is read in whichever
    way its product runs fastest here: MKL on the weight stored [out, in] or [in, out], oneDNN on the weight
    reordered into its blocked layout for one row, or mtnlg's own C product on the weights laid out as its decoding
    step reads them (in one block of huge pages). The second leaves mtnlg's product out: torch's own products, the
    ones transformers runs. The choice comes from timing every product inside whole passes over all the weights
    (alone, a few weights would sit in the cache), alternating the ways."""
    weights = multiplied_weights(model)
    vectors = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def mkl(w: torch.Tensor):
        return lambda: F.linear(vectors[w.shape[1]], w)

    def onednn(w: torch.Tensor):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        return lambda: torch.ops.mkldnn._linear_pointwise(vectors[w.shape[1]], packed, None, "none", [], "")

    def ours(w: torch.Tensor, laid_out: torch.Tensor):
        # the addresses are taken once, as the decoding step does: from Python each data_ptr() between two
        # products costs about 2% of a pass
        out = torch.empty(w.shape[0])
        product = functools.partial(library.mtnlg_matvec, laid_out.data_ptr(), vectors[w.shape[1]].data_ptr(),
                                    out.data_ptr(), *w.shape)
        product.buffers = laid_out, out  # alive as long as the product that writes and reads them
        return product

    ways = [[mkl(w) for w in weights], [mkl(w.t().contiguous().t()) for w in weights]]
    if torch.backends.mkldnn.is_available():
        ways.append([onednn(w) for w in weights])
    torch_ways = len(ways)
    library = native.load()
    if library is not None:
        blocked = native.in_one_block([native.as_product_takes_it(w) for w in weights])
        ways.append([ours(w, laid_out) for w, laid_out in zip(weights, blocked)])
    with torch.inference_mode():
        trials = [[[timed(product) for product in way] for way in ways] for _ in range(6)]  # [trial][way][weight]

    def median_time(way: int, weight: int) -> float:
        return statistics.median(trial[way][weight] for trial in trials)

    def one_token(candidates: int) -> Callable[[], float]:
        fastest = [ways[min(range(candidates), key=lambda way: median_time(way, i))][i] for i in range(len(weights))]

        def timing() -> float:  # steady state, as between two decoded tokens: the median of a few passes
            with torch.inference_mode():
                return statistics.median(timed(lambda: [product() for product in fastest]) for _ in range(16))
        return timing
    return one_token(len(ways)), one_token(torch_ways)


def run(quick: bool = False) -> list[Result]:
    from benchmarks.split_generate import results as split_results

    return (family_results("GPT", SHAPE, gpt2_with_same_weights, quick)
            + family_results("Llama-style", LLAMA_SHAPE, llama_with_same_weights, quick) + quantized_results(quick)
            + split_results(quick))


def family_results(family: str, shape: dict, peer_with_same_weights: Callable, quick: bool) -> list[Result]:
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.engine import Generator
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.model.architecture import Architecture

    torch.manual_seed(0)
    model = GPT(Architecture.from_dict(shape)).eval()
    peer = peer_with_same_weights(model)
    peer_name = f"transformers {type(peer).__name__}.generate()"
    generator = Generator(model, _IdTokenizer())
    repeats, new_tokens, pairs_a_round = (2, 16, 4) if quick else (5, 64, 12)

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.randint(8, shape["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))

    def ours(ids: torch.Tensor, count: int, clock: Optional[_TokenClock] = None) -> list[list[int]]:
        settings = SamplingSettings(max_new_tokens=count, temperature=0.0)
        return [c.tokens for c in generator.generate(ids.tolist(), settings, stop_token_ids=(), on_text=clock)]

    def theirs(ids: torch.Tensor, count: int, clock: Optional[_TokenClock] = None) -> list[list[int]]:
        with torch.inference_mode():
            out = peer.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                                min_new_tokens=count, do_sample=False, streamer=clock)
        return out[:, ids.shape[1]:].tolist()

    check = prompt(2, 32)
    with torch.inference_mode():
        torch.testing.assert_close(peer(check).logits, model(check), rtol=1e-4, atol=1e-4)
    assert ours(check, 16) == theirs(check, 16), "transformers and mtnlg disagree on greedy tokens"

    def per_token(fn, ids: torch.Tensor, count: int = new_tokens) -> float:
        """Seconds per decoded token: the median time between successive new tokens of one generation."""
        clock = _TokenClock(skip=1 if fn is theirs else 0)  # transformers also reports the prompt
        fn(ids, count, clock)
        return clock.median_interval()

    limit, torch_limit = matvec_limit(model)
    short, long_ = prompt(1, 64), prompt(1, 1000)
    batch8 = prompt(8, 64)
    figures: dict[str, list[float]] = {}
    measurements = {
        "ours b1 tok/s": lambda: new_tokens / timed(lambda: ours(short, new_tokens)),
        "theirs b1 tok/s": lambda: new_tokens / timed(lambda: theirs(short, new_tokens)),
        "ours b8 tok/s": lambda: 8 * new_tokens / timed(lambda: ours(batch8, new_tokens)),
        "theirs b8 tok/s": lambda: 8 * new_tokens / timed(lambda: theirs(batch8, new_tokens)),
        "ours ms/token ctx64": lambda: 1e3 * per_token(ours, short),
        "torch limit ms/token": lambda: 1e3 * torch_limit(),
        "theirs ms/token ctx64": lambda: 1e3 * per_token(theirs, short),
        "ours ms/token ctx1000": lambda: 1e3 * per_token(ours, long_, 16),  # 1000 + 17 positions of 1024
        "theirs ms/token ctx1000": lambda: 1e3 * per_token(theirs, long_, 16),
    }
    pairs: list[tuple[float, float]] = []  # (limit, decode) seconds per token, timed back to back
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, measure in measurements.items():
            value = measure()
            print(f"{family} round {round_} {name}: {value:.2f}", file=sys.stderr, flush=True)
            if round_:
                figures.setdefault(name, []).append(value)
        # the speed drifts by ±15% within seconds: each decode against the limit timed right before it
        for _ in range(pairs_a_round):
            pair = limit(), per_token(ours, short)
            print(f"{family} round {round_} limit / decode ms/token: {1e3 * pair[0]:.2f} / {1e3 * pair[1]:.2f}",
                  file=sys.stderr, flush=True)
            if round_:
                pairs.append(pair)

    threads = f"{torch.get_num_threads()} thread(s); shared machine, noisy"
    at_limit, ours_decode = [1 / limit_s for limit_s, _ in pairs], [1 / decode_s for _, decode_s in pairs]
    torch_limit_ms, decode_ms = (statistics.median(figures[k]) for k in ("torch limit ms/token", "ours ms/token ctx64"))
    paired = statistics.quantiles([limit_s / decode_s for limit_s, decode_s in pairs], n=4, method="inclusive")
    return [
        Result(f"{family}: greedy generate tokens/s, batch 1 (64-token prompt)", "tokens/s",
               figures["ours b1 tok/s"], figures["theirs b1 tok/s"], peer_name, notes=threads),
        Result(f"{family}: greedy generate tokens/s, batch 8 (64-token prompts)", "tokens/s",
               figures["ours b8 tok/s"], figures["theirs b8 tok/s"], peer_name, goal=">= 1.5x transformers",
               notes=threads),
        Result(f"{family}: decode tokens/s at batch 1 vs one matvec per weight", "tokens/s", ours_decode, at_limit,
               "matrix-vector limit", goal=">= 0.95x the limit" if family == "GPT" else ">= 0.9x the limit",
               notes=f"each decode over its own limit (middle half): {paired[1]:.2f}x "
               f"({paired[0]:.2f}-{paired[2]:.2f}x); {len(pairs)} pairs timed back to back; median time between "
               f"tokens; limit: each weight its fastest way (MKL either layout, oneDNN blocked, mtnlg C on huge "
               f"pages); against torch's products alone (MKL, oneDNN), {1e3 / torch_limit_ms:.0f} tokens/s: "
               f"{torch_limit_ms / decode_ms:.2f}x; {threads}"),
        Result(f"{family}: decode time per token, 64 tokens of context", "ms/token", figures["ours ms/token ctx64"],
               figures["theirs ms/token ctx64"], peer_name, higher_is_better=False),
        Result(f"{family}: decode time per token, 1000 tokens of context", "ms/token",
               figures["ours ms/token ctx1000"], figures["theirs ms/token ctx1000"], peer_name, higher_is_better=False,
               goal="flat as the context grows",
               notes=f"mtnlg 1000/64: {statistics.median(figures['ours ms/token ctx1000']) / decode_ms:.2f}x"),
    ]


def format_bytes(model) -> dict[str, int]:
    """Bytes of the weight matrices (the tied head once) in each format: what one token reads."""
    from mtnlg_cli.inference.quantize import BLOCK

    shapes = [tuple(w.shape) for w in multiplied_weights(model)]
    return {"fp32": sum(4 * r * c for r, c in shapes),
            "int8": sum(r * c + 4 * r for r, c in shapes),
            "int4": sum(r * c // 2 + 2 * 2 * r * c // BLOCK for r, c in shapes)}


def read_limit(library, size: int) -> Callable[[], float]:
    """Seconds to read `size` bytes once from one huge-page block (the median of a few reads)."""
    block = native.in_one_block([torch.zeros(-(-size // 64) * 16)])[0]
    block.view(torch.int32).random_()

    def timing() -> float:
        return statistics.median(timed(lambda: library.mtnlg_read(block.data_ptr(), block.numel() * 4))
                                 for _ in range(8))
    timing.block = block
    return timing


def quantized_results(quick: bool) -> list[Result]:
    from mtnlg_cli.inference.engine import Generator, SamplingSettings
    from mtnlg_cli.inference.quantize import Quantization, quantize_model
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT

    library = native.load()
    if library is None:
        print("no C compiler: the quantized decoding benchmark needs the native step", file=sys.stderr)
        return []
    torch.manual_seed(0)
    model = GPT(Architecture.from_dict(GPT_125M_SHAPE)).eval()
    tokenizer = _IdTokenizer(GPT_125M_SHAPE["vocab_size"])
    models = {"fp32": model, "int8": quantize_model(model, Quantization("int8")),
              "int4": quantize_model(model, Quantization("int4", 32))}
    generators = {name: Generator(m, tokenizer) for name, m in models.items()}
    limits = {name: read_limit(library, size) for name, size in format_bytes(model).items()}
    ids = torch.randint(8, GPT_125M_SHAPE["vocab_size"], (8, 64), generator=torch.Generator().manual_seed(1))
    new_tokens = 16 if quick else 64

    def decode_seconds(name: str) -> float:
        clock = _TokenClock(skip=0)
        generators[name].generate(ids[:1].tolist(), SamplingSettings(max_new_tokens=new_tokens, temperature=0.0),
                                  stop_token_ids=(), on_text=clock)
        return clock.median_interval()

    def batch8_step_seconds(name: str) -> float:
        """Seconds per decoding step of 8 rows: the time of `new_tokens` more tokens after the prompts."""
        def run(count: int) -> float:
            settings = SamplingSettings(max_new_tokens=count, temperature=0.0)
            return timed(lambda: generators[name].generate(ids.tolist(), settings, stop_token_ids=()))
        return (run(new_tokens + 1) - run(1)) / new_tokens

    decode = {name: [] for name in models}
    paired = {name: [] for name in models}  # each decode over the read limit timed right before it
    batch8 = {"fp32": [], "int8": []}
    for round_ in range((2 if quick else 6) + 1):  # round 0 warms up (and builds the decoding copies)
        for name in models:
            limit_s, decode_s = limits[name](), decode_seconds(name)
            print(f"round {round_} {name}: limit {1e3 * limit_s:.2f} ms, decode {1e3 * decode_s:.2f} ms/token",
                  file=sys.stderr, flush=True)
            if round_:
                decode[name].append(1 / decode_s)
                paired[name].append(limit_s / decode_s)
        for name in batch8:
            step_s = batch8_step_seconds(name)
            print(f"round {round_} {name} batch 8: {1e3 * step_s:.2f} ms/step", file=sys.stderr, flush=True)
            if round_:
                batch8[name].append(8 / step_s)

    threads = f"{torch.get_num_threads()} thread(s); shared machine, noisy"
    sizes = format_bytes(model)
    results = []
    for name, goal in (("int8", ">= 2.5x fp32"), ("int4", ">= 4x fp32")):
        results.append(Result(f"decode tokens/s at batch 1, {name} vs fp32 (gpt-125m shape)", "tokens/s",
                              decode[name], decode["fp32"], "fp32 (C step)", goal=goal, notes=threads))
    for name in models:
        middle = statistics.quantiles(paired[name], n=4, method="inclusive")
        results.append(Result(f"decode at batch 1 vs reading the {name} weights once (gpt-125m shape)", "x limit",
                              paired[name], goal=">= 0.85x the limit" if name != "fp32" else "",
                              notes=f"{sizes[name] / 1e6:.0f} MB a token; each decode over the read timed right "
                              f"before it (middle half {middle[0]:.2f}-{middle[2]:.2f}x); {threads}"))
    results.append(Result("decode tokens/s at batch 8, int8 vs fp32 (gpt-125m shape)", "tokens/s", batch8["int8"],
                          batch8["fp32"], "fp32", goal=">= 1.5x fp32", notes=threads))
    return results


if __name__ == "__main__":
    from benchmarks.run import print_results

    print_results(run(quick="--quick" in sys.argv))
