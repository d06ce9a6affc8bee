"""`mtnlg finetune` end to end: it teaches a tiny model a task it could not do (the behaviour test), LoRA
checkpoints hold adapters only and resume bit for bit, generate/chat/eval/convert use them without a merge step,
PEFT reads the exported adapters, the Python API, and bad input.

The base is a random tiny GPT saved as a checkpoint beside a SentencePiece tokenizer (no pretraining needed):
before fine-tuning it answers nothing correctly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, copy_workspace, run_cli
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.workspace import Workspace

WORDS = ("house sister father mother letter heart morning evening friend family money party brother young lady happy "
         "little great time").split()
SETTINGS = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=64",
            "model.max_position_embeddings=64", "train.micro_batch_size=16", "train.global_batch_size=16",
            "train.lr_warmup_iters=10", "train.log_interval=50", "train.eval_interval=100000",
            "train.save_interval=100000", "train.peak_tflops=1"]


def make_base_workspace(root: Path) -> Workspace:
    """A workspace with a SentencePiece tokenizer and a random model saved as checkpoint step 1."""
    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.data.tokenizer import train_tokenizer
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.workspace import init_workspace

    text = (REPO / "mtnlg_cli/templates/sample/en_austen_pride.txt").read_text(encoding="utf-8")[:150_000]
    tokenizer = train_tokenizer([line for line in text.split("\n") if line], root / "tok", vocab_size=1000)
    ws = init_workspace(root / "ws", overrides=[*SETTINGS, f"model.vocab_size={tokenizer.vocab_size}"])
    for name in ("tokenizer.model", "info.json"):
        (ws.tokenizer_dir / name).write_bytes((root / "tok" / name).read_bytes())
    config = ws.load_config()
    torch.manual_seed(0)
    model = GPT(Architecture.from_model_config(config.model))
    save_checkpoint(ws.checkpoints_dir, 1, {"model": model.state_dict()},
                    {"model_config": model.config.to_dict(), "config": config.to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 0, "loss": 0.0})
    return ws


def phrases(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(count)]


def repeat_examples(path: Path, texts: list[str], kind: str = "prompt") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            if kind == "prompt":
                record = {"prompt": f"Repeat after me: {text}", "completion": text}
            else:
                record = {"messages": [{"role": "user", "content": f"Repeat after me: {text}"},
                                       {"role": "assistant", "content": text}]}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base_workspace(tmp_path_factory.mktemp("base")).root


@pytest.fixture
def ws(base, tmp_path) -> Workspace:
    return copy_workspace(base, tmp_path / "ws")


def accuracy(ws: Workspace, held_out: Path) -> float:
    """The share of exact answers, generated greedily in the chat template (mtnlg eval --task generate's core)."""
    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.evaluation.generation import evaluate_generation
    from mtnlg_cli.finetune.examples import BadLines, read_examples
    from mtnlg_cli.inference.engine import Generator

    model, tokenizer, _ = load_for_inference(ws)
    examples = read_examples(held_out, "{text}", BadLines())
    metrics, _ = evaluate_generation(Generator(model, tokenizer), examples,
                                     SamplingSettings(max_new_tokens=12, temperature=0.0), batch_size=20)
    return metrics["exact_match"]


def test_fine_tuning_teaches_a_task_the_model_could_not_do(ws, tmp_path):
    """3,000 generated "Repeat after me: <words>" examples; held-out phrases answered in chat."""
    from mtnlg_cli.finetune.trainer import finetune

    train_file = repeat_examples(tmp_path / "train.jsonl", phrases(3000, seed=0))
    held_out = repeat_examples(tmp_path / "held_out.jsonl", phrases(40, seed=1), kind="messages")
    assert accuracy(ws, held_out) <= 0.05
    result = finetune(ws, ws.load_config(["train.train_iters=200", "train.lr=6e-3", "train.min_lr=1e-5"]),
                      [train_file])
    assert result.final_step == 200 and result.losses[200] < 0.3
    assert accuracy(ws, held_out) >= 0.9
    chat = run_cli("chat", "-t", "0", "-n", "12", cwd=ws.root,
                   input="Repeat after me: happy sister\n/reset\nRepeat after me: money\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.splitlines() == ["happy sister", "(conversation cleared)", "money"]  # one-turn examples


def run_finetune(ws: Workspace, data: Path, *overrides: str, **kwargs):
    from mtnlg_cli.finetune.trainer import finetune

    return finetune(ws, ws.load_config(list(overrides)), [data], **kwargs)


def test_lora_trains_adapters_alone_resumes_bit_for_bit_and_inference_merges_them(ws, base, tmp_path):
    from safetensors.torch import load_file

    from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint, load_model
    from mtnlg_cli.finetune.lora import merge_adapters

    data = repeat_examples(tmp_path / "train.jsonl", phrases(200, seed=2))
    lora = ["finetune.method=lora", "finetune.lora_rank=4", "finetune.lora_dropout=0.1", "train.lr=1e-2",
            "train.global_batch_size=16", "train.micro_batch_size=8", "train.lr_decay_iters=4"]
    straight = run_finetune(ws, data, *lora, "train.train_iters=4")
    resumed_ws = copy_workspace(base, tmp_path / "resumed")
    run_finetune(resumed_ws, data, *lora, "train.train_iters=2")
    resumed = run_finetune(resumed_ws, data, *lora, "train.train_iters=4")
    assert resumed.start_step == 2 and resumed.final_step == 4
    assert [resumed.losses[s] for s in (3, 4)] == [straight.losses[s] for s in (3, 4)]  # bit for bit

    checkpoint = load_checkpoint(latest_checkpoint(ws.checkpoints_dir))
    assert checkpoint.path.name == "step_0000005"  # numbered after the base, step 1
    assert sorted(p.name for p in checkpoint.path.iterdir()) == ["adapter.safetensors", "optimizer.safetensors",
                                                                 "rng.safetensors", "state.json"]
    adapters = load_file(checkpoint.path / "adapter.safetensors")
    assert load_file(resumed.checkpoint / "adapter.safetensors").keys() == adapters.keys()
    for name, tensor in load_file(resumed.checkpoint / "adapter.safetensors").items():
        assert torch.equal(tensor, adapters[name]), name
    # adapters on every linear layer of both blocks; optimizer state for them alone
    assert len(adapters) == 2 * 4 * 2 and all(name.rpartition(".")[2] in ("lora_A", "lora_B") for name in adapters)
    assert {key.rpartition(".")[0] for key in load_file(checkpoint.path / "optimizer.safetensors")} == set(adapters)
    assert checkpoint.state["finetune"]["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.1,
                                                    "targets": ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]}

    base_weights = load_checkpoint(ws.checkpoints_dir / "step_0000001").tensors("model")
    merged = load_model(checkpoint).state_dict()  # what generate, chat, eval and serve load
    expected = merge_adapters(base_weights, adapters, 16.0 / 4)
    assert any(not torch.equal(merged[k], base_weights[k]) for k in base_weights)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name



def test_the_base_of_adapters_survives_pruning_and_a_saved_copy(ws, tmp_path):
    from mtnlg_cli.api import MegatronLM
    from mtnlg_cli.checkpoint import list_checkpoints

    data = repeat_examples(tmp_path / "train.jsonl", phrases(64, seed=3))
    run_finetune(ws, data, "finetune.method=lora", "train.train_iters=4", "train.save_interval=1",
                 "train.keep_last=2")
    assert [p.name for p in list_checkpoints(ws.checkpoints_dir)] == ["step_0000001", "step_0000004", "step_0000005"]
    saved = MegatronLM.from_workspace(ws.root, quiet=True).save(tmp_path / "saved")
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["latest", "step_0000001", "step_0000005"]
    text = MegatronLM.from_pretrained(saved, quiet=True).generate("Repeat after me: house", max_new_tokens=3,
                                                                  temperature=0)
    assert text.startswith("Repeat after me: house")


def test_full_fine_tune_resumes_and_pretraining_does_not_continue_it(ws, tmp_path):
    from mtnlg_cli.training.trainer import train

    data = repeat_examples(tmp_path / "train.jsonl", phrases(64, seed=4))
    first = run_finetune(ws, data, "train.train_iters=2")
    assert first.checkpoint.name == "step_0000003"
    again = run_finetune(ws, data, "train.train_iters=2")  # the same data: nothing left to do
    assert again.final_step == again.start_step == 2
    other = repeat_examples(tmp_path / "other.jsonl", phrases(64, seed=5))
    second = run_finetune(ws, other, "train.train_iters=1")  # other data: a new fine-tune of the latest
    assert second.start_step == 0 and second.checkpoint.name == "step_0000004"
    with pytest.raises(MtnlgError, match="step_0000004 is a fine-tune .* which pretraining does not continue"):
        train(ws, ws.load_config(["train.train_iters=10"]))


HOLD_LOCK = """
import sys, time
from mtnlg_cli.lock import WorkspaceLock
with WorkspaceLock(sys.argv[1], "training"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_lock_and_ctrl_c_work_as_in_train(ws, tmp_path):
    from mtnlg_cli.events import Metrics

    data = repeat_examples(tmp_path / "train.jsonl", phrases(200, seed=6))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ws.root)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(MtnlgError, match=rf"^another mtnlg process \(pid {holder.pid}\) is training"):
            run_finetune(ws, data, "train.train_iters=1")
    finally:
        holder.kill()
        holder.wait()

    def ctrl_c_after_step_2(event):
        if isinstance(event, Metrics) and event.record.get("step") == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = run_finetune(ws, data, "finetune.method=lora", "train.train_iters=100", "train.log_interval=1",
                          report=ctrl_c_after_step_2)
    assert result.interrupted == "SIGINT" and result.final_step == 2
    assert result.checkpoint.name == "step_0000003"  # saved at the step boundary; the same command resumes it
    assert run_finetune(ws, data, "finetune.method=lora", "train.train_iters=3").start_step == 2


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl"], "no such file: "),
    (["{data}", "--set", "finetune.lora_rank=0"], "finetune.lora_rank=0 must be positive"),
    (["{data}", "--method", "lora", "--set", "parallel.pipeline_parallel=2"],
     "finetune.method=lora runs on one process, with data parallelism or with FSDP, not with "
     "parallel.pipeline_parallel=2"),
    (["{bad}"], "bad.jsonl:2: empty assistant turn"),
    (["{text}"], "text.jsonl:1: no known example format (keys: text)"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(ws, tmp_path, args, message):
    data = repeat_examples(tmp_path / "train.jsonl", phrases(4, seed=7))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n')
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "pretraining data, not examples"}\n')

    def files():  # (the training lock's empty file stays, as after any run)
        return sorted(p.name for p in ws.root.rglob("*") if p.name != ".mtnlg.lock")

    before = files()
    done = run_cli("finetune", *[a.format(data=data, bad=bad, text=text) for a in args], cwd=ws.root)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr
    assert files() == before


def test_a_workspace_without_a_checkpoint_is_refused_in_one_line(ws, tmp_path):
    shutil.rmtree(ws.checkpoints_dir)
    data = repeat_examples(tmp_path / "train.jsonl", phrases(4, seed=7))
    done = run_cli("finetune", str(data), cwd=ws.root)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: no checkpoint to fine-tune in ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and not list(ws.checkpoints_dir.glob("step_*"))


@pytest.mark.parametrize("overrides, message", [
    (["finetune.lora_rank=2.5"], "finetune.lora_rank=2.5 must be an integer"),
    (["finetune.lora_targets=[mlp.gate]"], "names mlp.gate, which only a SwiGLU model"),
    (["model.seq_length=8"], "train.jsonl:1: the example is"),
    (["model.hidden_size=32"], "step_0000001 is a model with hidden_size=64, but the config gives hidden_size=32"),
])
def test_bad_settings_and_data_are_refused_before_anything_is_written(ws, tmp_path, overrides, message):
    data = repeat_examples(tmp_path / "train.jsonl", phrases(4, seed=7))
    with pytest.raises(MtnlgError, match=message):
        run_finetune(ws, data, *overrides)
    assert sorted(p.name for p in ws.checkpoints_dir.iterdir() if p.name != ".mtnlg.lock") == ["latest", "step_0000001"]
    with pytest.raises(MtnlgError, match="no checkpoint at"):
        run_finetune(ws, data, base=tmp_path / "nowhere")


def test_skip_bad_lines_and_truncate_count_what_they_did(ws, tmp_path):
    from mtnlg_cli.events import Notice

    data = tmp_path / "mixed.jsonl"
    long_answer = {"prompt": "Repeat after me: house", "completion": " ".join(WORDS * 3)}
    long_question = {"prompt": " ".join(WORDS * 3), "completion": "house"}
    data.write_text("\n".join([json.dumps({"prompt": "Repeat after me: house", "completion": "house"}),
                               "{not json", json.dumps(long_answer), json.dumps(long_question)]) + "\n")
    notices = []
    result = run_finetune(ws, data, "train.train_iters=1", "finetune.skip_bad_lines=true",
                          report=lambda e: notices.append(e.message) if isinstance(e, Notice) else None)
    assert result.final_step == 1
    assert any(n.startswith("skipped 3 bad examples (first: ") and "mixed.jsonl:2: not valid JSON" in n for n in notices)
    notices.clear()
    run_finetune(ws, data, "train.train_iters=1", "finetune.skip_bad_lines=true", "finetune.truncate=true",
                 report=lambda e: notices.append(e.message) if isinstance(e, Notice) else None)
    assert any("skipped 2 bad examples" in n for n in notices)  # the long question leaves no answer when cut...
    assert any("cut 1 example(s) to model.seq_length=64 tokens" in n for n in notices)  # ...the long answer some


def test_peft_reads_the_exported_adapters_on_the_exported_base(ws, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint, load_model
    from mtnlg_cli.finetune.peft_export import export_peft_adapter

    data = repeat_examples(tmp_path / "train.jsonl", phrases(64, seed=8))
    run_finetune(ws, data, "finetune.method=lora", "finetune.lora_targets=[attn.qkv, mlp.proj]", "train.lr=5e-2",
                 "train.train_iters=3", "train.lr_warmup_iters=0")
    base_dir, adapter_dir, merged_dir = tmp_path / "hf", tmp_path / "adapter", tmp_path / "merged"
    latest = load_checkpoint(latest_checkpoint(ws.checkpoints_dir))
    hf_export(load_checkpoint(ws.checkpoints_dir / "step_0000001"), base_dir)
    hf_export(latest, merged_dir)  # the adapters merged into the weights
    done = run_cli("convert", "export", "--adapter", str(adapter_dir), cwd=ws.root)
    assert done.returncode == 0, done.stderr
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn.c_attn", "mlp.c_proj"] and config["r"] == 8
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    ours = load_model(load_checkpoint(latest_checkpoint(ws.checkpoints_dir)))
    tokens = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(tokens), theirs(tokens).logits
        with theirs.disable_adapter():
            base_logits = theirs(tokens).logits
    assert (base_logits - expected).abs().max() > 1e-2  # the adapters change the model...
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # ...as PEFT applies them
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(tokens).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    with pytest.raises(MtnlgError, match="step_0000001 holds no LoRA adapters"):
        export_peft_adapter(load_checkpoint(ws.checkpoints_dir / "step_0000001"), tmp_path / "none", torch.float32)


def hf_export(checkpoint, out_dir: Path) -> None:
    from mtnlg_cli.convert import export_weights, weights_from_checkpoint

    export_weights(weights_from_checkpoint(checkpoint, None, 0), out_dir, "hf")


def test_eval_generate_scores_a_summarization_set_from_the_shared_corpora(ws, tmp_path, shared_data):
    """`mtnlg eval --task generate` on document/summary pairs made from tests/data (the base model's answers are
    noise; what is checked is that each answer is scored against its reference and the table and JSON agree)."""
    from mtnlg_cli.evaluation.generation import exact_match, rouge_l, token_f1

    paragraphs = [" ".join(p.split()) for p in (shared_data / "en_austen_pride_sense.txt").read_text(
        encoding="utf-8").split("\n\n")]
    pairs = [{"document": p, "summary": p.split(". ")[0] + "."} for p in paragraphs if 80 < len(p) < 200 and ". " in p]
    data = tmp_path / "summaries.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs[:6]), encoding="utf-8")
    out = tmp_path / "scores.json"
    done = run_cli("eval", "--task", "generate", "--data", str(data), "--max-new-tokens", "6", "-o", str(out),
                   cwd=ws.root)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    answers = results["answers"][str(data)]
    assert [a["reference"] for a in answers] == [pair["summary"] for pair in pairs[:6]]
    assert [a["where"] for a in answers] == [f"{data}:{line}" for line in range(1, 7)]
    for answer in answers:
        prediction, reference = answer["prediction"], answer["reference"]
        assert 0 <= answer["tokens"] <= 6  # (a reply may end at once)
        assert answer["exact_match"] == exact_match(prediction, reference)
        assert answer["token_f1"] == token_f1(prediction, reference)
        assert answer["rouge_l"] == rouge_l(prediction, reference)
    assert any(answer["prediction"] for answer in answers)
    metrics = results["results"][str(data)]
    assert metrics["examples"] == 6
    for key in ("exact_match", "token_f1", "rouge_l"):
        assert metrics[key] == pytest.approx(sum(a[key] for a in answers) / 6)
    assert "summaries.jsonl" in done.stdout and "ROUGE" in done.stdout.upper()


def test_python_api_fine_tunes_with_lora_then_chats(ws):
    from mtnlg_cli.api import MegatronLM
    from mtnlg_cli.checkpoint import load_checkpoint

    model = MegatronLM.from_workspace(ws.root, quiet=True)
    examples = [{"messages": [{"role": "user", "content": f"Repeat after me: {p}"},
                              {"role": "assistant", "content": p}]} for p in phrases(400, seed=9)]
    result = model.finetune(examples, method="lora", lora_rank=16, lora_alpha=32, train_iters=30, lr=2e-2,
                            min_lr=1e-3)
    # (adapters on a random base with a frozen embedding learn slowly: the behaviour test trains all weights)
    assert result.losses[30] < result.losses[1] - 0.3
    assert load_checkpoint(result.checkpoint).state["finetune"]["lora"]["rank"] == 16
    reply = model.chat("Repeat after me: house", temperature=0, max_new_tokens=8)
    assert model._chat_session.messages[-1] == {"role": "assistant", "content": reply}
    assert json.loads((ws.root / "data/api/finetune.jsonl").read_text().splitlines()[0]) == examples[0]
    with pytest.raises(MtnlgError, match="data must be a JSONL file"):
        model.finetune([1, 2])


def test_peft_reads_adapters_on_a_llama_models_split_projections(tmp_path):
    """A Llama-family model's fused qkv adapter becomes PEFT adapters on q_proj, k_proj and v_proj (grouped
    queries), and the SwiGLU gate's on gate_proj; PEFT on the LlamaForCausalLM export computes mtnlg's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mtnlg_cli.checkpoint import load_checkpoint, load_model, save_checkpoint
    from mtnlg_cli.config import load_config
    from mtnlg_cli.finetune.lora import LoraSettings, add_adapters, adapter_tensors
    from mtnlg_cli.finetune.peft_export import export_peft_adapter
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT

    config = load_config({"model": {
        "num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 96,
        "seq_length": 32, "max_position_embeddings": 32, "vocab_size": 256, "position_embedding_type": "rope",
        "normalization": "RMSNorm", "swiglu": True, "untie_embeddings_and_output_weights": True,
        "add_bias_linear": False}, "finetune": {"method": "lora", "lora_rank": 4}})
    architecture = Architecture.from_model_config(config.model)
    torch.manual_seed(0)
    model = GPT(architecture)
    state = {"model_config": architecture.to_dict(), "consumed_samples": 0}
    root = tmp_path / "checkpoints"
    base = save_checkpoint(root, 1, {"model": model.state_dict()}, state)
    settings = LoraSettings.from_config(config.finetune, architecture)
    add_adapters(model, settings)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.05)
    adapted = save_checkpoint(root, 2, {"adapter": adapter_tensors(model.state_dict())},
                              {**state, "finetune": {"method": "lora", "base": base.name,
                                                     "lora": settings.to_dict()}})
    hf_export(load_checkpoint(base), tmp_path / "hf")
    export_peft_adapter(load_checkpoint(adapted), tmp_path / "adapter", torch.float32)
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["target_modules"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                             "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert config_json["fan_in_fan_out"] is False
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                       tmp_path / "adapter").eval()
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = load_model(load_checkpoint(adapted))(tokens), theirs(tokens).logits
        with theirs.disable_adapter():
            base_logits = theirs(tokens).logits
    assert (base_logits - expected).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
