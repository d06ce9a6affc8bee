"""The generation engine (KV cache, batching, sampling, stops, streaming, sliding) and `mtnlg generate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from mtnlg_cli.errors import MtnlgError

CONTEXT = 64
ENGLISH = "It is a truth universally acknowledged"
CHINESE = "床前明月光，疑是地上霜。"


def make_trained_workspace(root: Path, context: int = CONTEXT):
    """A workspace with a tokenizer and a checkpoint of a tiny random GPT (no trainer needed).

    The model never ends a text on its own: the output rows of the end-of-document and role tokens point away
    from a large bias of the final LayerNorm, so their logits are far below every other token's. Tests then
    control every stop, and a chat reply runs until it is interrupted.
    """
    from mtnlg_cli.data.tokenizer import train_tokenizer
    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.workspace import init_workspace

    text = (Path(__file__).resolve().parents[1] / "mtnlg_cli/templates/sample/en_austen_pride.txt").read_text(
        encoding="utf-8")[:60_000] + "\n" + CHINESE
    tokenizer = train_tokenizer([line for line in text.split("\n") if line], root / "tok", vocab_size=600)
    ws = init_workspace(root / "ws", overrides=[
        "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", f"model.max_position_embeddings={context}",
        f"model.seq_length={context}", f"model.vocab_size={tokenizer.vocab_size}"])
    for name in ("tokenizer.model", "info.json"):
        (ws.tokenizer_dir / name).write_bytes((root / "tok" / name).read_bytes())
    cfg = ws.load_config()
    torch.manual_seed(0)
    model = GPT(Architecture.from_model_config(cfg.model)).eval()
    with torch.no_grad():
        away = torch.nn.functional.normalize(torch.randn(cfg.model.hidden_size), dim=0)
        model.ln_f.bias.copy_(20 * away)
        for token in (tokenizer.eos_id, *tokenizer.role_ids.values()):
            model.wte.weight[token] = -5 * away
    save_checkpoint(ws.checkpoints_dir, 1, {"model": model.state_dict()},
                    {"model_config": model.config.to_dict(), "config": cfg.to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 0, "loss": 0.0})
    return ws


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_trained_workspace(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def generator(ws):
    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.inference.engine import Generator

    model, tokenizer, _ = load_for_inference(ws)
    return Generator(model, tokenizer)


def greedy(**changes):
    from mtnlg_cli.config import SamplingSettings

    return SamplingSettings(temperature=0.0, **changes)


def recomputed_greedy(generator, prompt: str, count: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the unchanged model at every step."""
    tokenizer = generator.tokenizer
    ids = generator.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(count):
            logits = generator.model(torch.tensor([ids]))[0, -1, :tokenizer.vocab_size]
            logits[tokenizer.pad_id] = float("-inf")
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def test_kv_cached_greedy_equals_recomputing_the_whole_sequence(generator):
    [completion] = generator.generate([ENGLISH], greedy(max_new_tokens=30), stop_token_ids=())
    assert completion.tokens == recomputed_greedy(generator, ENGLISH, 30)
    assert completion.finish_reason == "length" and completion.prompt_tokens == len(generator.encode(ENGLISH))


def test_batched_prompts_of_different_lengths_equal_one_by_one(generator):
    prompts = [ENGLISH, "Mr. Darcy", "", CHINESE]
    batched = generator.generate(prompts, greedy(max_new_tokens=12), stop_token_ids=())
    single = [generator.generate([p], greedy(max_new_tokens=12), stop_token_ids=())[0] for p in prompts]
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    assert [c.text for c in batched] == [c.text for c in single]
    assert single[2].prompt_tokens == 1  # an empty prompt starts from the end-of-document token


def test_decoding_copy_computes_what_the_model_computes_and_leaves_it_alone(generator):
    from mtnlg_cli.inference.cpu_decoder import cpu_decoding_copy

    model = generator.model
    before = {name: (p.stride(), p.clone()) for name, p in model.named_parameters()}
    tokens = torch.randint(4, generator.tokenizer.vocab_size, (3, 20))
    with torch.no_grad():
        expected = model(tokens)
        for batch_size in (1, 3):
            torch.testing.assert_close(cpu_decoding_copy(model, batch_size)(tokens), expected, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        assert p.stride() == before[name][0] and torch.equal(p, before[name][1]), name


_LLAMA = {"position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True, "num_query_groups": 2,
          "untie_embeddings_and_output_weights": True, "add_bias_linear": False}
_LLAMA3_SCALING = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8}
NATIVE_OPTIONS = {  # each option of the model alone (in the C step's edge cases), then whole families
    "gpt": {},
    "gpt_wide_fc": {"ffn_hidden_size": 20},  # the fc matrix wide, the MLP's projection tall
    "rope_partial": {"position_embedding_type": "rope", "rotary_percent": 0.5, "rotary_base": 500.0},
    "rope_llama3_scaling": {"position_embedding_type": "rope", "rope_scaling": _LLAMA3_SCALING},
    "rmsnorm": {"normalization": "RMSNorm"},
    "swiglu": {"swiglu": True},  # gate and up 70 rows each: the last block of 16 is short
    "swiglu_wide": {"swiglu": True, "ffn_hidden_size": 20},  # gate and up 40 rows together: wide
    "gqa": {"num_query_groups": 2},
    "mqa": {"num_query_groups": 1},
    "untied": {"untie_embeddings_and_output_weights": True},
    "no_bias": {"add_bias_linear": False},
    "qkv_bias": {"add_bias_linear": False, "add_qkv_bias": True},
    "llama": _LLAMA,
    "llama3": {**_LLAMA, "rope_scaling": _LLAMA3_SCALING, "untie_embeddings_and_output_weights": False},
    "qwen2": {**_LLAMA, "add_qkv_bias": True},
}


@pytest.mark.parametrize("option", list(NATIVE_OPTIONS))
def test_native_step_computes_what_the_model_computes(option):
    """The C step token by token against the whole sequence through the model in float64, for each architecture
    option alone and together, on shapes at its edges (rows not a multiple of four or sixteen, tall and wide
    matrices, six heads of 8 dimensions) and with large weights, so that GeLU, SwiGLU and softmax see large inputs.
    Norm weights and biases are not their initial ones, so that a weight read in the wrong place shows.

    With weights of std 1 the logits reach 20-35, and torch's own fp32 forward is up to 6e-4 off the float64 one:
    the C step must be as close (2.5e-5 of the largest logit)."""
    from mtnlg_cli.inference import native
    from mtnlg_cli.model.gpt import GPT, KVCache
    from mtnlg_cli.model.architecture import Architecture

    library = native.load()
    assert library is not None, "the C decoding step did not build: is a C compiler installed?"
    torch.manual_seed(0)
    shape = dict(vocab_size=37, max_position_embeddings=24, num_layers=2, hidden_size=48, num_heads=6,
                 ffn_hidden_size=70, init_method_std=1.0)
    model = GPT(Architecture(**{**shape, **NATIVE_OPTIONS[option]})).eval()
    tokens = torch.randint(0, 37, (1, 24))
    largest = []
    model.layers["0"].mlp.fc.register_forward_hook(lambda module, args, out: largest.append(out.abs().max()))
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.dim() == 1:
                tensor.normal_(1.0 if "ln" in name else 0.0, 0.1)
        exact = model.double()(tokens)[0].float()
        model.float()
        assert largest[0] > 20  # GeLU's or SwiGLU's inputs
        cache = KVCache(model.config, 1, 24)
        model(tokens[:, :5], cache=cache)
        step = native.NativeStep(native.NativeWeights(library, model), cache)
        for position in range(5, 24):
            logits = step(int(tokens[0, position]))[0]
            torch.testing.assert_close(logits, exact[position], rtol=0, atol=2.5e-5 * exact.abs().max().item())
            assert step.argmax == int(logits.argmax())
        with pytest.raises(IndexError):
            step(0)  # the cache is full


def test_generation_with_and_without_the_native_step_gives_the_same_tokens(generator, monkeypatch):
    from mtnlg_cli.inference import native

    calls = []
    step = native.NativeStep.__call__
    monkeypatch.setattr(native.NativeStep, "__call__", lambda self, token: calls.append(token) or step(self, token))
    [fast] = generator.generate([ENGLISH], greedy(max_new_tokens=30), stop_token_ids=())
    assert calls == fast.tokens[:-1]  # every token but the last went through the C step
    monkeypatch.setattr(native, "load", lambda: None)
    [plain] = generator.generate([ENGLISH], greedy(max_new_tokens=30), stop_token_ids=())
    assert plain.tokens == fast.tokens and len(calls) == 29


def test_greedy_takes_a_given_argmax_only_where_it_may_be_picked(generator):
    from mtnlg_cli.inference.sampling import Sampler

    tokenizer = generator.tokenizer
    sampler = Sampler(greedy(), tokenizer, [[5]], torch.device("cpu"))
    logits = torch.zeros(1, tokenizer.vocab_size + 3)
    logits[0, 7], logits[0, tokenizer.pad_id], logits[0, tokenizer.vocab_size + 1] = 1.0, 3.0, 5.0
    assert sampler(logits, [7]) == [7]  # taken as it is: the caller vouches that it is the argmax
    assert sampler(logits, [tokenizer.pad_id]) == sampler(logits, [tokenizer.vocab_size + 1]) == [7]
    assert sampler(logits) == [7]
    favoured = torch.zeros(1, tokenizer.vocab_size)
    favoured[0, 9] = 100.0
    for changes in ({"temperature": 1.0, "seed": 0}, {"repetition_penalty": 1.5}):  # not plain greedy: ignored
        assert Sampler(greedy().replace(**changes), tokenizer, [[5]], torch.device("cpu"))(favoured, [7]) == [9]


def test_native_build_is_cached_and_without_a_compiler_generation_uses_torch(tmp_path, monkeypatch):
    from mtnlg_cli.inference import native

    monkeypatch.setenv("MTNLG_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    try:
        assert native.load() is not None
        [built] = tmp_path.iterdir()
        assert built.name.startswith("decode_step-") and built.suffix == ".so"
        for setting in (("CC", str(tmp_path / "no-such-compiler")), ("CC", "false"), ("MTNLG_NATIVE", "0")):
            monkeypatch.setenv(*setting)
            native.load.cache_clear()
            assert native.load() is None, setting
        assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no half-built library left behind
    finally:
        native.load.cache_clear()


def test_native_weights_lie_in_one_huge_page_block_that_outlives_its_sources():
    import gc
    from pathlib import Path

    from mtnlg_cli.inference import native

    sources = [torch.randn(300, 7), torch.randn(5), torch.randn(7, 9).t()]
    expected = [t.clone() for t in sources]
    copies = native.in_one_block(sources)
    del sources
    gc.collect()
    assert all(torch.equal(c, e) and c.is_contiguous() for c, e in zip(copies, expected))
    addresses = [c.data_ptr() for c in copies]
    assert addresses[0] % (2 << 20) == 0 and all(a % 64 == 0 for a in addresses)
    assert addresses == sorted(addresses) and addresses[-1] - addresses[0] < 2 << 20  # in order, one block
    smaps = Path("/proc/self/smaps")
    if smaps.exists():  # Linux: the mapping holding the block is advised for huge pages ("hg") and private (Linux
        # gives shared anonymous memory no huge pages)
        mapping = None
        for line in smaps.read_text().splitlines():
            if "-" in line.split(" ", 1)[0] and not line.startswith("VmFlags"):
                low, high = (int(part, 16) for part in line.split(" ", 1)[0].split("-"))
                mapping = low <= addresses[0] < high
            elif line.startswith("VmFlags") and mapping:
                assert "hg" in line.split() and "sh" not in line.split(), line
                break
        else:
            raise AssertionError("the block is in no mapping of /proc/self/smaps")


def test_stop_strings_stop_and_are_never_shown(generator):
    [free] = generator.generate([ENGLISH], greedy(max_new_tokens=40), stop_token_ids=())
    stop = free.text[10:13]
    cut = free.text.index(stop)
    pieces = []
    [stopped] = generator.generate([ENGLISH], greedy(max_new_tokens=40, stop=["never-there", stop]),
                                   on_text=lambda row, piece: pieces.append(piece))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:cut] and "".join(pieces) == stopped.text
    assert len(stopped.tokens) < 40


def test_stop_token_ends_the_row_without_being_included(generator):
    [free] = generator.generate([ENGLISH], greedy(max_new_tokens=20), stop_token_ids=())
    stop_token = free.tokens[5]
    [stopped] = generator.generate([ENGLISH], greedy(max_new_tokens=20), stop_token_ids=[stop_token])
    first = free.tokens.index(stop_token)
    assert stopped.finish_reason == "eos" and stopped.tokens == free.tokens[:first]


def test_streamed_pieces_add_up_to_the_text_that_decoding_gives(generator):
    tokenizer = generator.tokenizer
    for prompt in (ENGLISH, CHINESE, ""):
        pieces = []
        [completion] = generator.generate([prompt], greedy(max_new_tokens=25), stop_token_ids=(),
                                          on_text=lambda row, piece: pieces.append(piece))
        assert len(pieces) > 1 and "".join(pieces) == completion.text
        full = tokenizer.decode(generator.encode(prompt) + completion.tokens)
        assert full == tokenizer.decode(generator.encode(prompt)) + completion.text


def test_a_character_split_over_byte_tokens_streams_whole(generator):
    """A character outside the vocabulary is byte tokens (SentencePiece's byte fallback): the stream holds its
    first bytes back and hands out the whole character with the last one, never U+FFFD."""
    from mtnlg_cli.inference.engine import TextStream

    tokenizer = generator.tokenizer
    rare = "\u9f98\u9f98"  # not in the test tokenizer's 600 pieces: three byte tokens each
    prompt = tokenizer.encode(CHINESE)
    ids = tokenizer.encode(CHINESE + rare)[len(prompt):]
    assert tokenizer.encode(CHINESE + rare)[:len(prompt)] == prompt
    assert len(ids) == 6 and tokenizer.decode(ids[:1]) == "\ufffd"  # bytes, as the model would generate them
    stream = TextStream(tokenizer, prompt)
    pieces = [stream.push(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == rare and all("\ufffd" not in piece for piece in pieces)
    assert [piece for piece in pieces if piece] == ["\u9f98", "\u9f98"]


def test_same_seed_same_sample_and_sampling_options_behave(generator):
    from mtnlg_cli.config import SamplingSettings

    def sample(**options):
        settings = SamplingSettings(max_new_tokens=20, temperature=1.0, **options)
        return generator.generate([ENGLISH, "Mr. Darcy"], settings, stop_token_ids=())

    first, again, other = sample(seed=7), sample(seed=7), sample(seed=8)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    assert [c.tokens for c in first] != [c.tokens for c in other]
    greedy_tokens = [c.tokens for c in generator.generate([ENGLISH, "Mr. Darcy"], greedy(max_new_tokens=20),
                                                          stop_token_ids=())]
    assert [c.tokens for c in sample(seed=1, top_k=1)] == greedy_tokens
    assert [c.tokens for c in sample(seed=1, top_p=1e-6)] == greedy_tokens


def test_repetition_penalty_avoids_tokens_already_present(generator):
    [completion] = generator.generate([ENGLISH], greedy(max_new_tokens=30, repetition_penalty=1e6),
                                      stop_token_ids=())
    everything = generator.encode(ENGLISH) + completion.tokens
    assert len(set(completion.tokens)) == 30 and not set(completion.tokens) & set(generator.encode(ENGLISH))
    assert len(set(everything)) == len(set(generator.encode(ENGLISH))) + 30


def test_long_prompt_keeps_its_last_tokens_and_generation_slides_past_the_window(generator):
    from mtnlg_cli.inference.engine import GenerationWarning

    ids = generator.encode(ENGLISH * 8)
    assert len(ids) > CONTEXT
    with pytest.warns(GenerationWarning, match="keeping its last 64"):
        [cut] = generator.generate([ids], greedy(max_new_tokens=10), stop_token_ids=())
    [tail] = generator.generate([ids[-CONTEXT:]], greedy(max_new_tokens=10), stop_token_ids=())
    assert cut.prompt_tokens == CONTEXT and cut.tokens == tail.tokens

    # 3 windows of new tokens; until the cache first fills, it matches recomputing the whole sequence
    [long] = generator.generate(["Mr. Darcy"], greedy(max_new_tokens=3 * CONTEXT), stop_token_ids=())
    assert len(long.tokens) == 3 * CONTEXT and long.finish_reason == "length"
    room = CONTEXT - len(generator.encode("Mr. Darcy")) + 1
    assert long.tokens[:room] == recomputed_greedy(generator, "Mr. Darcy", room)


def test_invalid_sampling_values_are_refused(generator):
    from mtnlg_cli.config import SamplingSettings

    for bad, message in (({"top_p": 0.0}, "top_p=0.0 must be in"), ({"top_p": 1.5}, "top_p"),
                         ({"temperature": -1.0}, "temperature=-1.0 must be non-negative"),
                         ({"top_k": -2}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(MtnlgError, match=message):
            generator.generate(["x"], SamplingSettings(**bad))


# ---------------------------------------------------------------------------------------------------------------
# The command.


def mtnlg(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """Runs the CLI's entry point in this process (exit code, stdout, stderr)."""
    import io

    from mtnlg_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["mtnlg", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def test_generate_prints_clean_text_and_stats(ws, generator, capsys, monkeypatch):
    code, out, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), ENGLISH, "-", "-t", "0", "-n", "15",
                           "--stats", stdin="Mr. Darcy")
    assert code == 0, err
    expected = generator.generate([ENGLISH, "Mr. Darcy"], greedy(max_new_tokens=15))
    assert out == "\n\n".join(c.text for c in expected) + "\n"
    assert "prompt tokens: " in err and "generated tokens: 30" in err and "tokens/s" in err


def test_generate_jsonl_in_and_out_with_samples_and_prompt_style(ws, generator, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": ENGLISH, "id": "a"}) + "\n\n" + json.dumps({"prompt": "Mr."}) + "\n")
    out_path = tmp_path / "out.jsonl"
    code, out, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "--input", str(prompts), "--output",
                           str(out_path), "--num-samples", "2", "--seed", "3", "-n", "8", "--top-k", "50",
                           "--prompt-style", "summarize")
    assert code == 0, err
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [(r.get("id"), r["prompt"], r["sample"]) for r in rows] == [
        ("a", ENGLISH, 0), ("a", ENGLISH, 1), (None, "Mr.", 0), (None, "Mr.", 1)]
    assert all(r["completion_tokens"] == 8 and r["finish_reason"] == "length" for r in rows)
    assert rows[0]["prompt_tokens"] == len(generator.encode(ENGLISH + "\n\nTL;DR:"))
    assert rows[0]["completion"] != rows[1]["completion"]  # two samples of one prompt differ


@pytest.mark.parametrize("args, message", [
    (["--top-p", "1.5"], "error: top_p=1.5 must be in (0, 1]"),
    (["--temperature", "-1"], "error: temperature=-1.0 must be non-negative"),
    (["--set", "generate.top_p=0"], "error: generate.top_p=0.0 must be in (0, 1]"),
    (["--prompt-style", "poem"], "error: unknown prompt style 'poem'"),
    (["--input", "missing.jsonl"], "error: cannot read prompts from missing.jsonl"),
])
def test_generate_bad_input_is_one_line_and_exit_2(ws, args, message, capsys, monkeypatch):
    code, out, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "hello", *args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_an_output_that_cannot_be_written_is_one_line_before_generating(ws, capsys, monkeypatch):
    out_path = ws.config_path / "out.jsonl"  # under a file
    code, out, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "hello", "-n", "5",
                           "--output", str(out_path))
    assert code == 2 and out == "" and err == f"error: cannot write {out_path}: not a directory\n"


def test_generate_refuses_missing_checkpoint_and_other_tokenizer(ws, tmp_path, capsys, monkeypatch):
    from mtnlg_cli.workspace import init_workspace

    empty = init_workspace(tmp_path / "empty")
    code, _, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(empty.root), "hello")
    assert code == 2 and "no checkpoint" in err and "mtnlg train" in err
    other = init_workspace(tmp_path / "other")
    from mtnlg_cli.data.tokenizer import train_tokenizer

    other_text = (other.raw_dir / "en_austen_pride.txt").read_text(encoding="utf-8")[100_000:140_000]
    train_tokenizer([line for line in other_text.split("\n") if line], other.tokenizer_dir, vocab_size=600)
    code, _, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(other.root), "--checkpoint",
                         str(ws.checkpoints_dir / "latest"), "hello")
    assert code == 2 and "trained with tokenizer" in err


def test_generate_as_a_user_runs_it(ws):
    """One real subprocess: the console entry point, from inside the workspace, with no prompt at all."""
    result = run_cli("generate", "-n", "5", "-t", "0", cwd=ws.root)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_unreadable_prompt_file_is_one_line_and_exit_2(ws, capsys, monkeypatch):
    bad = ws.root / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    code, _, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "--file", str(bad))
    assert code == 2 and err.startswith(f"error: cannot read prompts from {bad}") and err.count("\n") == 1


def interrupt_at_sampling_step(monkeypatch, step: int) -> None:
    """Ctrl-C arrives during the `step`-th sampling step of the run (counting over all batches)."""
    from mtnlg_cli.inference import engine

    real, calls = engine.Sampler.__call__, []

    def sampling(self, logits, argmaxes=None):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(self, logits, argmaxes)

    monkeypatch.setattr(engine.Sampler, "__call__", sampling)


@pytest.mark.parametrize("to_file", [True, False])
def test_ctrl_c_keeps_the_finished_results_and_the_unfinished_continuation(ws, generator, tmp_path, capsys,
                                                                           monkeypatch, to_file):
    interrupt_at_sampling_step(monkeypatch, 8)  # the first prompt takes steps 1-5, the second gets 2 tokens
    out_path = tmp_path / "out.jsonl"
    code, out, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), ENGLISH, "Mr. Darcy", "-t", "0",
                           "-n", "5", "--batch-size", "1", *(["--output", str(out_path)] if to_file else []))
    assert code == 130
    assert "Stopped by SIGINT: kept 2 result(s), the last one unfinished" in err
    finished, = generator.generate([ENGLISH], greedy(max_new_tokens=5))
    partial, = generator.generate(["Mr. Darcy"], greedy(max_new_tokens=2))
    if not to_file:
        assert out == finished.text + "\n\n" + partial.text + "\n"
        return
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["finish_reason"], r["completion_tokens"]) for r in rows] == [
        (ENGLISH, finished.text, "length", 5), ("Mr. Darcy", partial.text, "interrupted", 2)]


def test_sigterm_keeps_the_results_made_so_far(ws, tmp_path):
    """A real process stopped by SIGTERM while it decodes far past the context window."""
    import os
    import signal
    import subprocess
    import time

    out_path = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "mtnlg_cli", "generate", "-w", str(ws.root), "-t", "0",
                                "-n", "1000000", "--output", str(out_path), ENGLISH],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    note = process.stderr.readline()  # said just before decoding starts
    assert "generation slides" in note, note + process.communicate(timeout=60)[1]
    assert not out_path.exists()  # nothing finished yet
    time.sleep(3.0)  # some tokens, even on a busy machine
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "Stopped by SIGTERM: kept 1 result(s), the last one unfinished" in err
    [row] = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert row["finish_reason"] == "interrupted" and row["completion_tokens"] > 0 and row["completion"]
    assert os.path.getsize(out_path) > 0


def test_on_a_terminal_each_prompt_is_shown_dimmed_and_prompts_are_separated(ws, generator, capsys, monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    first, second = generator.generate([ENGLISH, "Mr. Darcy"], greedy(max_new_tokens=5))
    code, out, _ = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), ENGLISH, "Mr. Darcy", "-t", "0",
                         "-n", "5")
    assert code == 0
    assert f"\x1b[2m{ENGLISH}\x1b[0m{first.text}\n" in out and f"\x1b[2mMr. Darcy\x1b[0m{second.text}\n" in out
    between = out[out.index(first.text) + len(first.text):out.index("Mr. Darcy")]
    assert "─" * 10 in between  # a rule between the prompts
    code, out, _ = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), ENGLISH, "-t", "0", "-n", "5",
                         "--no-echo")
    assert code == 0 and out == first.text + "\n"


def test_prompts_are_text_files_come_with_file_and_notes_explain_odd_output(ws, generator, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Dear").write_text("Mr. Darcy", encoding="utf-8")
    word, = generator.generate(["Dear"], greedy(max_new_tokens=5))
    code, out, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "Dear", "-t", "0", "-n", "5")
    assert code == 0 and out == word.text + "\n"  # the word, not the file it happens to name
    assert "'Dear' is taken as the prompt text; to read the file, use --file Dear" in err
    from_file, = generator.generate(["Mr. Darcy"], greedy(max_new_tokens=5))
    code, out, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "-f", "Dear", "-f", "-", "-t", "0",
                           "-n", "5", stdin="Mr. Darcy")
    assert code == 0 and out == f"{from_file.text}\n\n{from_file.text}\n" and "note" not in err

    first_character = generator.generate([ENGLISH], greedy(max_new_tokens=1))[0].text[:1]
    code, out, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), ENGLISH, "-t", "0", "-n", "5",
                           "--stop", first_character)
    assert code == 0 and out == "\n"
    assert "note: continuation 1 is empty: the model produced a stop string at once" in err

    code, _, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "Dear", "-t", "0", "-n", "5")
    assert "slides" not in err
    code, _, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "Dear", "-t", "0",
                         "-n", str(CONTEXT))
    assert code == 0 and (f"note: the prompt and {CONTEXT} new tokens exceed the model's context of {CONTEXT} "
                          "tokens; past it, generation slides on") in err
