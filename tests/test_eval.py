"""mtnlg eval: perplexity, bits per byte, cloze and multiple choice, multi-process, the lm-eval-harness adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.evaluation import scoring as ev

CONTEXT = 32
STEPS = 150


def train_small_workspace(root, hidden_size: int = 32, num_heads: int = 2):
    """A workspace in `root` with a tokenizer and a checkpoint of a tiny GPT trained for a moment on its sample
    text; returns (workspace, model, tokenizer, text)."""
    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.data.tokenizer import train_tokenizer
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.workspace import init_workspace

    overrides = ["model.num_layers=2", f"model.hidden_size={hidden_size}", f"model.num_heads={num_heads}",
                 f"model.seq_length={CONTEXT}", "model.max_position_embeddings=64", "model.vocab_size=512",
                 "model.make_vocab_size_divisible_by=64"]
    workspace = init_workspace(root / "ws", overrides=overrides)
    config = workspace.load_config()
    text = (workspace.raw_dir / "en_austen_pride.txt").read_text(encoding="utf-8")[:60_000]
    tokenizer = train_tokenizer(text.splitlines(), workspace.tokenizer_dir, config.model.vocab_size)
    torch.manual_seed(0)
    model_config = Architecture.from_model_config(config.model)
    model = GPT(model_config)
    stream = torch.tensor(tokenizer.encode(text))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        starts = torch.randint(0, len(stream) - CONTEXT - 1, (16,))
        batch = torch.stack([stream[s:s + CONTEXT + 1] for s in starts])
        model(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().requires_grad_(False)
    save_checkpoint(workspace.checkpoints_dir, STEPS, {"model": model.state_dict()},
                    {"model_config": model_config.to_dict(), "config": config.to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 0, "loss": None})
    return workspace, model, tokenizer, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_workspace(tmp_path_factory.mktemp("eval"))


def by_hand_nll(model, sequence: list[int]) -> float:
    """Summed next-token cross-entropy of `sequence`, straight from the model's logits."""
    tokens = torch.tensor([sequence])
    logits = model(tokens[:, :-1])
    return float(F.cross_entropy(logits[0].double(), tokens[0, 1:], reduction="sum"))


def test_perplexity_is_exp_of_mean_token_loss_from_the_logits(trained):
    _, model, tokenizer, text = trained
    paragraphs = [p for p in text.split("\n\n") if 10 < len(tokenizer.encode(p)) < CONTEXT][:5]
    documents = [ev.Document(tokenizer.encode(p), len(p.encode())) for p in paragraphs]
    result = ev.evaluate_perplexity(model, documents, tokenizer.eos_id, CONTEXT, stride=CONTEXT, batch_size=3)

    nll = sum(by_hand_nll(model, [tokenizer.eos_id, *d.tokens]) for d in documents)
    tokens = sum(len(d.tokens) for d in documents)
    assert result.tokens == tokens and result.documents == 5
    assert result.bytes == sum(len(p.encode()) for p in paragraphs)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / result.bytes, rel=1e-5)


def test_sliding_window_with_stride_equal_to_context_is_non_overlapping_chunks(trained):
    _, model, tokenizer, text = trained
    tokens = tokenizer.encode(text[:3000])[:150]  # several windows and a short last one
    full = [tokenizer.eos_id, *tokens]
    chunks = sum(by_hand_nll(model, full[start:start + CONTEXT + 1]) for start in range(0, len(tokens), CONTEXT))
    (logprob,) = ev.document_logprobs(model, [tokens], tokenizer.eos_id, CONTEXT, stride=CONTEXT)
    assert -float(logprob) == pytest.approx(chunks, rel=1e-5)

    # A smaller stride scores every token exactly once, but with more context: a different total.
    spans = ev.rolling_spans(tokens, tokenizer.eos_id, CONTEXT, stride=8)
    assert sum(len(s.tokens) - s.score_from for s in spans) == len(tokens)
    assert all(len(s.tokens) - 1 <= CONTEXT for s in spans)
    assert all(s.score_from - 1 >= CONTEXT - 8 for s in spans[1:])
    (overlapped,) = ev.document_logprobs(model, [tokens], tokenizer.eos_id, CONTEXT, stride=8)
    assert float(overlapped) != pytest.approx(float(logprob), rel=1e-4)


def greedy_continuation(model, tokenizer, context: str, steps: int) -> str:
    ids = tokenizer.encode(context)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tokenizer.decode(ids)[len(tokenizer.decode(tokenizer.encode(context))):]


def test_choice_whose_answer_is_the_greedy_continuation_scores_one(trained):
    _, model, tokenizer, _ = trained
    items = []
    for i, context in enumerate(["It is a truth universally", "Mr. Bennet replied that", "She was"]):
        answer = greedy_continuation(model, tokenizer, context, steps=3)
        choices = [" the letter was", " of no use", answer]
        choices[2], choices[i] = choices[i], choices[2]
        items.append(ev.ChoiceItem(context, choices, i))
    result = ev.evaluate_choice(model, tokenizer, items, CONTEXT, delimiter="")
    assert result["acc"] == 1.0 and result["items"] == 3
    # The same answers under a wrong label score 0.
    wrong = [ev.ChoiceItem(it.context, it.choices, (it.label + 1) % 3) for it in items]
    assert ev.evaluate_choice(model, tokenizer, wrong, CONTEXT, delimiter="")["acc"] == 0.0

    # acc_norm: the best log-likelihood per character of the choice, as lm-evaluation-harness defines it.
    def by_hand(item):
        spans = [ev.pair_span(*ev.encode_pair(tokenizer, item.context, c, tokenizer.eos_id), CONTEXT)
                 for c in item.choices]
        lls = [by_hand_nll(model, s.tokens[:s.score_from]) - by_hand_nll(model, s.tokens) for s in spans]
        return max(range(len(lls)), key=lambda k: lls[k] / len(item.choices[k])) == item.label
    assert result["acc_norm"] == sum(map(by_hand, items)) / 3


def test_cloze_scores_last_word_greedy_accuracy_and_perplexity(trained):
    _, model, tokenizer, text = trained
    passages = [" ".join(p.split()[:8]) for p in text.split("\n\n") if len(p.split()) >= 8][:6]  # < CONTEXT tokens
    greedy_word = "It is a truth universally" + greedy_continuation(model, tokenizer, "It is a truth universally", 1)
    items = [ev.cloze_item(p, "passage", tokenizer) for p in passages + [greedy_word]]
    result = ev.evaluate_cloze(model, tokenizer, items, CONTEXT)

    lls, greedy = [], []
    for item in items:
        context_ids, target_ids = ev.encode_pair(tokenizer, item.context, item.target, tokenizer.eos_id)
        sequence = torch.tensor([context_ids + target_ids])
        logits = model(sequence[:, :-1])[0, len(context_ids) - 1:]
        lls.append(float(logits.double().log_softmax(-1).gather(1, sequence[0, len(context_ids):, None]).sum()))
        greedy.append(bool((logits.argmax(-1) == sequence[0, len(context_ids):]).all()))
    assert result["items"] == 7
    assert result["acc"] == sum(greedy) / 7
    assert result["perplexity"] == pytest.approx(math.exp(-sum(lls) / 7), rel=1e-5)


def test_build_cloze_items_from_text(trained):
    tokenizer = trained[2]
    text = ("one two three four five six, seven eight nine ten eleven twelve \"thirteen!\"\n\n"
            "too short.\n\n" + " ".join(f"w{i}" for i in range(30)) + " ...\n")
    items = ev.build_cloze_items(text, tokenizer, min_words=10)
    assert [it.target for it in items] == [" twelve", " w29"]
    assert items[0].context == "one two three four five six, seven eight nine ten eleven"
    assert items[1].context == " ".join(f"w{i}" for i in range(29))


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', "label 2 is outside the 2 choices"),
    ('{"context": "a", "choices": ["x"], "label": 0}', "at least two non-empty strings"),
    ('{"context": "a", "choices": ["x", "y"]}', "missing key 'label'"),
    ('{"context": "a", "choices": ["x", "y"], "label": "0"}', "'label' must be a int"),
    ('{"context": "a", "choices": ["x", "y"], "label": true}', "'label' must be a int"),
    ('{"context": "a", "choices": ["x", "y"], "label": 0', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"context": "\\ud800", "choices": ["x", "y"], "label": 0}', "lone surrogate"),
    ('{"context": "a", "choices": ["x", "y"], "label": 1' + "0" * 5000 + '}', "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_bad_choice_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n\n' + line + "\n")
    with pytest.raises(MtnlgError, match=f"task.jsonl:3: .*{message}"):
        ev.read_choice_items(path)


def test_bad_cloze_and_data_files(trained, tmp_path):
    path = tmp_path / "cloze.jsonl"
    path.write_text('{"text": "two words"}\n{"text": "oneword"}\n')
    with pytest.raises(MtnlgError, match="cloze.jsonl:2: a cloze text needs at least two words"):
        ev.read_cloze_items(path, trained[2])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MtnlgError, match="empty.jsonl is empty"):
        ev.read_texts(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(MtnlgError, match="has no text"):
        ev.read_texts(blank)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"body": "wrong key"}\n')
    with pytest.raises(MtnlgError, match="data.jsonl:2: missing key 'text'"):
        ev.read_texts(data)
    with pytest.raises(MtnlgError, match="stride 0 must be between 1"):
        ev.rolling_spans([5, 6], 3, CONTEXT, 0)


def test_lm_eval_harness_runs_local_tasks_on_the_checkpoint_and_agrees_with_mtnlg_eval(trained, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mtnlg_cli.evaluation.lm_eval_adapter import MtnlgLM

    workspace, model, tokenizer, text = trained
    contexts = ["It is a truth universally", "Mr. Bennet replied that", "She was", "My dear"]
    items = [ev.ChoiceItem(c, ["acknowledged", "not", "a wife"], k % 3) for k, c in enumerate(contexts)]
    answers = [greedy_continuation(model, tokenizer, c, steps=4).split("\n")[0] for c in contexts]
    documents = [p for p in text.split("\n\n") if p.strip()][10:14]
    write_jsonl(tmp_path / "choice.jsonl", [{"context": it.context, "choices": it.choices, "label": it.label,
                                             "answer": a} for it, a in zip(items, answers)])
    write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in documents])
    data = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        "mtnlg_choice": {"output_type": "multiple_choice", "doc_to_text": "{{context}}",
                         "doc_to_choice": "{{choices}}", "doc_to_target": "label",
                         "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "mtnlg_text": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [{"metric": "bits_per_byte"}]},
        "mtnlg_generate": {"output_type": "generate_until", "doc_to_text": "{{context}}",
                           "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4},
                           "metric_list": [{"metric": "exact_match"}]},
    }
    for name, task in tasks.items():
        source = "text.jsonl" if name == "mtnlg_text" else "choice.jsonl"
        kwargs = {"data_files": {"test": str(tmp_path / source)}, "cache_dir": str(tmp_path / "hf")}
        (tmp_path / f"{name}.yaml").write_text(json.dumps({"task": name, **data, "dataset_kwargs": kwargs, **task}))

    from lm_eval.api.registry import get_model

    assert get_model("mtnlg") is MtnlgLM  # what `--model mtnlg` finds once the adapter is imported
    lm = MtnlgLM(workspace=str(workspace.root), batch_size=4, device="cpu")
    assert lm.max_length == CONTEXT and lm.checkpoint.step == STEPS
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True)
    results = output["results"]

    # Every choice's log-likelihood is the one mtnlg eval computes, and so are acc and acc_norm.
    harness = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in output["samples"]["mtnlg_choice"]}
    spans = [ev.pair_span(*ev.encode_pair(tokenizer, it.context, " " + c, tokenizer.eos_id), CONTEXT)
             for it in items for c in it.choices]
    assert [ll for doc in sorted(harness) for ll in harness[doc]] == pytest.approx(
        ev.score_spans(model, spans).logprob.tolist(), rel=1e-6)
    mine = ev.evaluate_choice(model, tokenizer, items, CONTEXT)
    assert results["mtnlg_choice"]["acc,none"] == pytest.approx(mine["acc"])
    assert results["mtnlg_choice"]["acc_norm,none"] == pytest.approx(mine["acc_norm"])
    rolling = ev.evaluate_perplexity(model, [ev.Document(tokenizer.encode(d), len(d.encode())) for d in documents],
                                     tokenizer.eos_id, CONTEXT, stride=CONTEXT)
    assert results["mtnlg_text"]["bits_per_byte,none"] == pytest.approx(rolling.bits_per_byte, rel=1e-6)
    assert results["mtnlg_generate"]["exact_match,none"] == 1.0


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_eval_command_prints_a_table_writes_json_and_appends_to_a_run(trained, tmp_path):
    workspace, _, _, text = trained
    paragraphs = [p.strip() for p in text[20_000:30_000].split("\n\n") if p.strip()]
    data = tmp_path / "held_out.txt"
    data.write_text("\n\n".join(paragraphs), encoding="utf-8")
    (workspace.runs_dir / "run1").mkdir()
    args = ["eval", "-w", str(workspace.root), "--data", str(data), "--stride", "8", "-b", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    single = subprocess.run([sys.executable, "-m", "mtnlg_cli", *args, "-o", str(tmp_path / "one.json"),
                             "--run", "run1"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    assert "bits per byte" in single.stdout and "held_out.txt" in single.stdout
    assert f"each document on its own, windows of {CONTEXT} tokens every 8" in single.stdout  # what it measured
    one = json.loads((tmp_path / "one.json").read_text())
    metrics = one["results"][str(data)]
    assert (one["step"], one["context"], one["stride"]) == (STEPS, CONTEXT, 8)
    assert metrics["documents"] == len(paragraphs) and metrics["bytes"] == sum(len(p.encode()) for p in paragraphs)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    [record] = [json.loads(line) for line in (workspace.runs_dir / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == STEPS and record["eval/held_out/perplexity"] == metrics["perplexity"]

    # Two processes share the batches and give exactly the single-process result.
    two = subprocess.run([sys.executable, "-m", "mtnlg_cli", *args, "--num-processes", "2", "-o",
                          str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text())["results"] == one["results"]


def invoke(*args: str):
    from typer.testing import CliRunner

    from mtnlg_cli.cli import app

    return CliRunner().invoke(app, ["eval", *args], env={"COLUMNS": "200"})


def test_eval_command_scores_the_workspace_splits_and_builds_cloze_sets(trained, tmp_path):
    workspace, _, _, text = trained
    result = invoke("-w", str(workspace.root), "-o", str(tmp_path / "splits.json"))
    assert result.exit_code == 0, result.output
    splits = json.loads((tmp_path / "splits.json").read_text())["results"]
    assert set(splits) == {"valid", "test"} and all(s["tokens"] > 0 and s["bytes"] > 0 for s in splits.values())
    assert "valid" in result.output and "test" in result.output

    source = tmp_path / "book.txt"
    source.write_text(text[:20_000], encoding="utf-8")
    result = invoke("-w", str(workspace.root), "--task", "cloze", "--from", str(source), "--min-words", "15",
                    "-o", str(tmp_path / "cloze.json"))
    assert result.exit_code == 0, result.output
    [cloze] = json.loads((tmp_path / "cloze.json").read_text())["results"].values()
    assert cloze["items"] == len(ev.build_cloze_items(text[:20_000], trained[2], min_words=15)) > 5
    assert 0 <= cloze["acc"] <= 1 and cloze["perplexity"] > 1


def test_eval_command_bad_input_is_a_one_line_error(trained, tmp_path):
    workspace, *_ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 1}\n{"context": "b", "choices": ["x", "y"], '
                   '"label": 5}\n')
    cases = [
        (["--task", "choice", "--data", str(bad)], "bad.jsonl:2: label 5 is outside the 2 choices"),
        (["--task", "cloze"], "--task cloze needs a task file"),
        (["--task", "choice", "--split", "valid", "--data", str(bad)], "--split applies to --task perplexity only"),
        (["--data", str(bad)], "bad.jsonl:1: missing key 'text'"),
        (["--data", str(bad), "--run", "nope"], "no run 'nope'"),
        (["--data", str(tmp_path / "missing.txt")], "no such file"),
        (["--context", "999", "--data", str(bad)], "context 999 must be between 1 and"),
        (["--stride", "0", "--data", str(bad)], "stride 0 must be between 1"),
        (["--stride", "33", "--data", str(bad)], "stride 33 must be between 1 and the context length 32"),
        (["--data", str(bad), "-o", str(tmp_path / "no" / "out.json")], "no folder"),
    ]
    for args, message in cases:
        result = invoke("-w", str(workspace.root), *args)
        assert isinstance(result.exception, MtnlgError), (args, result.output)
        assert message in str(result.exception), (args, str(result.exception))
