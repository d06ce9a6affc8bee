"""Fine-tuning data: the four formats, bad lines, the loss mask in each chat format (against transformers' own
assistant mask), packing, and the masked loss (packed rows equal the examples one at a time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.finetune.examples import BadLines, read_examples
from mtnlg_cli.finetune.render import render_example
from test_pretrained_tokenizer import CHAT_TEMPLATE, byte_level_bpe, save_hf_tokenizer

STYLE = "{text}\n\nTL;DR:"


def write_lines(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def test_each_format_is_detected_per_file_and_read_as_a_conversation(tmp_path):
    files = {
        "chat": write_lines(tmp_path / "chat.jsonl", {"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]}),
        "pc": write_lines(tmp_path / "pc.jsonl", {"prompt": "2+2=", "completion": "4"}),
        "alpaca": write_lines(tmp_path / "alpaca.jsonl", {"instruction": "Translate.", "input": "chat", "output": "cat"},
                              {"instruction": "Say hi.", "input": "", "output": "hi"}),
        "sum": write_lines(tmp_path / "sum.jsonl", {"document": "A long text.", "summary": "Short."}),
    }
    read = {name: [list(e.messages) for e in read_examples(path, STYLE, BadLines())] for name, path in files.items()}
    user, assistant = (lambda text: {"role": "user", "content": text}), (lambda text: {"role": "assistant",
                                                                                       "content": text})
    assert read["chat"][0][0] == {"role": "system", "content": "Be brief."}
    assert read["pc"] == [[user("2+2="), assistant("4")]]
    assert read["alpaca"] == [[user("Translate.\n\nchat"), assistant("cat")], [user("Say hi."), assistant("hi")]]
    assert read["sum"] == [[user("A long text.\n\nTL;DR:"), assistant("Short.")]]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('{"prompt": 1' + "0" * 5000 + ', "completion": "x"}', "not valid JSON (ValueError)"),
    ('{"prompt": "\\ud800", "completion": "x"}', "lone surrogate"),
    ('["a list"]', "expected a JSON object, got list"),
    ({"text": "pretraining text"}, "this conversations file's lines need a list 'messages'; 'messages' is missing"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "role 'tool', which is not allowed"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": "hello"}, "'messages' is str"),
])
def test_a_bad_line_is_an_error_naming_file_and_line_or_is_skipped_and_counted(tmp_path, line, problem):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_lines(tmp_path / "data.jsonl", good, line, good)
    with pytest.raises(MtnlgError) as error:
        read_examples(path, STYLE, BadLines())
    assert str(error.value).startswith(f"{path}:2: ") and problem in str(error.value)
    bad = BadLines(skip=True)
    assert len(read_examples(path, STYLE, bad)) == 2
    assert bad.summary().startswith(f"skipped 1 bad example (first: {path}:2: ")


def test_a_file_keeps_the_format_of_its_first_example(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", {"prompt": "a", "completion": "b"}, {"document": "c", "summary": "d"})
    with pytest.raises(MtnlgError, match=r"mixed.jsonl:2: this prompt/completion file's lines need a string 'prompt' "
                                         r"and a string 'completion'; 'prompt' is missing"):
        read_examples(path, STYLE, BadLines())
    unknown = write_lines(tmp_path / "text.jsonl", {"text": "pretraining text"})
    with pytest.raises(MtnlgError, match=r"text.jsonl:1: no known example format \(keys: text\); expected messages, "
                                         r"prompt/completion, instruction/input/output \(Alpaca\) or document/summary"):
        read_examples(unknown, STYLE, BadLines())


# ---------------------------------------------------------------------------------------------------------------
# Loss masks


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    from mtnlg_cli.data.tokenizer import train_tokenizer

    text = (Path(__file__).resolve().parents[1] / "tests/data/en_austen_pride_sense.txt").read_text()[:40_000]
    return train_tokenizer([line for line in text.split("\n") if line], tmp_path_factory.mktemp("sp"), 400)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell."}]


def test_role_token_mask_counts_each_assistant_content_and_its_end_token(sentencepiece):
    from mtnlg_cli.inference.chat import render_chat

    tok = sentencepiece
    rendered = render_example(tok, CONVERSATION)
    assert rendered.ids == render_chat(tok, CONVERSATION, add_generation_prompt=False)  # as chat renders it
    role, end, nl = tok.role_ids, tok.role_ids["<|end|>"], tok.token_id("\n")
    expected = []
    for message in CONVERSATION:
        content = tok.encode(message["content"])
        mine = message["role"] == "assistant"
        expected += [(role[f"<|{message['role']}|>"], False), *[(i, mine) for i in content], (end, mine), (nl, False)]
    assert list(zip(rendered.ids, rendered.trained)) == expected
    assert tok.decode([i for i, t in zip(rendered.ids, rendered.trained) if t]) == "Hello there.<|end|> Farewell.<|end|>"
    assert all(render_example(tok, CONVERSATION, train_on_prompt=True).trained)


GENERATION_TEMPLATE = """{% for message in messages %}<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}
{% else %}{{ message['content'] }}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def byte_level(shared_data):
    return byte_level_bpe(shared_data, vocab_size=800)


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, GENERATION_TEMPLATE], ids=["incremental", "generation_block"])
def test_template_mask_is_the_assistants_text_and_end_token_as_transformers_marks_it(byte_level, template,
                                                                                       tmp_path):
    from transformers import AutoTokenizer

    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.inference.chat import render_chat

    folder = save_hf_tokenizer(byte_level, tmp_path / "tok", template, bos_token="<|endoftext|>",
                               eos_token="<|im_end|>", unk_token="<|endoftext|>")
    ours, theirs = Tokenizer.load(folder), AutoTokenizer.from_pretrained(folder)
    conversation = [*CONVERSATION[:4], {"role": "assistant", "content": "再见，朋友。"}]
    rendered = render_example(ours, conversation)
    assert rendered.ids == render_chat(ours, conversation, add_generation_prompt=False)
    learned = [i for i, t in zip(rendered.ids, rendered.trained) if t]
    assert ours.decode(learned) == "Hello there.<|im_end|>再见，朋友。<|im_end|>"
    if template is GENERATION_TEMPLATE:  # transformers reads the same blocks
        marked = theirs.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert marked["input_ids"] == rendered.ids
        assert [bool(m) for m in marked["assistant_masks"]] == rendered.trained


def test_a_template_that_hides_earlier_turns_is_refused_with_what_to_do(byte_level, tmp_path):
    from mtnlg_cli.data.tokenizer import Tokenizer

    last_only = ("{% for message in messages %}{% if loop.last %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder = save_hf_tokenizer(byte_level, tmp_path / "tok", last_only, eos_token="<|im_end|>")
    with pytest.raises(MtnlgError, match="does not render a conversation as growing prefixes .* set "
                                         "finetune.train_on_prompt=true"):
        render_example(Tokenizer.load(folder), CONVERSATION)


def test_plain_transcript_mask_and_end_of_document(byte_level, tmp_path):
    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.inference.chat import render_chat

    folder = save_hf_tokenizer(byte_level, tmp_path / "tok", None, eos_token="<|endoftext|>")
    tok = Tokenizer.load(folder)
    rendered = render_example(tok, CONVERSATION)
    assert rendered.ids == render_chat(tok, CONVERSATION, add_generation_prompt=False) + [tok.eos_id]
    learned = [i for i, t in zip(rendered.ids, rendered.trained) if t]
    assert tok.decode(learned) == " Hello there.\n Farewell.\n<|endoftext|>"


# ---------------------------------------------------------------------------------------------------------------
# Packing and the masked loss


def random_examples(count: int, vocab: int, seed: int):
    from mtnlg_cli.finetune.render import Rendered

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(4, 14, (), generator=generator))
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        trained = (torch.rand(length, generator=generator) < 0.6).tolist()
        trained[-1] = True
        examples.append(Rendered(ids, trained))
    return examples


def test_rows_pack_examples_with_restarting_positions_and_visit_every_row_each_epoch():
    from mtnlg_cli.finetune.rows import ExampleRows
    from mtnlg_cli.model.gpt import IGNORE_INDEX, packed_attention_mask

    examples = random_examples(40, 50, seed=0)
    rows = ExampleRows(examples, 32, packing=True, seed=3, pad_id=0)
    unpacked = ExampleRows(examples, 32, packing=False, seed=3, pad_id=0)
    assert len(unpacked) == 40 and len(rows) < 40 / 2
    assert rows.padding_share < 0.15 < unpacked.padding_share
    assert sorted(i for row in rows.rows for i in row) == list(range(40))
    assert sorted(rows.row(s) for s in range(len(rows), 2 * len(rows))) == list(range(len(rows)))  # epoch 2
    batch = rows.batch(range(len(rows)), counted=0)
    for r in range(len(rows)):
        starts = [i for i in range(32) if batch.positions[r, i] == 0]
        assert len(starts) == len(rows.rows[rows.row(r)])  # one start per example, padding continues the last
    mask = packed_attention_mask(batch.positions)
    first = rows.rows[rows.row(0)]
    a = len(examples[first[0]].ids) - 1  # the first example's length: the second may not see it
    assert mask[0, 0, a, :a].sum() == 0 and mask[0, 0, a - 1, :a].all() and mask[0, 0, a, a]
    assert int((batch.targets != IGNORE_INDEX).sum()) == sum(sum(e.trained[1:]) for e in examples)


@pytest.mark.parametrize("position_embedding", ["learned_absolute", "rope"])
def test_loss_and_gradients_of_a_packed_batch_equal_the_examples_one_at_a_time(position_embedding):
    from mtnlg_cli.config import load_config
    from mtnlg_cli.finetune.rows import ExampleRows
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.training.runtime import make_runtime

    config = load_config({}, ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
                              "model.seq_length=32", "model.max_position_embeddings=32", "model.vocab_size=50",
                              "model.make_vocab_size_divisible_by=16", "train.micro_batch_size=2",
                              "train.global_batch_size=6", f"model.position_embedding_type={position_embedding}"])
    examples = random_examples(20, 50, seed=1)
    rows = ExampleRows(examples, 32, packing=True, seed=0, pad_id=0)
    assert len(rows) == 6 and max(len(row) for row in rows.rows) > 1
    runtime = make_runtime(config)
    torch.manual_seed(0)
    model = runtime.build_model(Architecture.from_model_config(config.model))
    counted = rows.counted_targets(range(6))
    packed_loss = runtime.forward_backward(rows.batch(range(6), counted))
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    total = 0.0
    for example in examples:  # alone: no padding, positions from 0, the plain causal mask
        ids = torch.tensor(example.ids)
        targets = torch.where(torch.tensor(example.trained[1:]), ids[1:], -100)
        loss = model(ids[None, :-1], targets[None]) * int((targets != -100).sum()) / counted
        loss.backward()
        total += loss.item()
    assert packed_loss == pytest.approx(total, abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=0, msg=name)


def test_fused_loss_ignores_targets_as_cross_entropy_does():
    from mtnlg_cli.model.gpt import IGNORE_INDEX, linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (40,))
    targets[::3] = IGNORE_INDEX
    ours = linear_cross_entropy(hidden, weight, targets)
    ours.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grads, (hidden.grad, weight.grad))
    assert linear_cross_entropy(hidden, weight, torch.full((40,), IGNORE_INDEX)).item() == 0.0


@pytest.mark.parametrize("prediction, reference", [
    ("The cat sat on the mat.", "a cat sat on a mat"),
    ("Mr. Darcy walked away", "Darcy walked quickly away from Mr. Bingley"),
    ("it is a truth universally acknowledged", "a truth that is universally acknowledged, it is"),
    ("nothing in common", "something else entirely"),
])
def test_generation_scores_are_squads_and_rouge_scores(prediction, reference):
    from rouge_score import rouge_scorer

    from mtnlg_cli.evaluation.generation import exact_match, normalize_answer, rouge_l, token_f1

    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    shared = sum(min(predicted.count(w), wanted.count(w)) for w in set(predicted))
    f1 = 0.0 if shared == 0 else 2 * shared / (len(predicted) + len(wanted))
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert exact_match(prediction, reference) == float(predicted == wanted)
    assert exact_match("The Cat  sat, on the mat!", "cat sat on mat") == 1.0


def test_generation_scores_count_each_chinese_character_as_a_word():
    from mtnlg_cli.evaluation.generation import rouge_l, token_f1

    assert rouge_l("床前明月光", "明月光") == pytest.approx(2 * 1.0 * 0.6 / 1.6)  # LCS 3 of 5 and of 3 characters
    assert token_f1("疑是地上霜", "地上霜") == pytest.approx(0.75)


def test_the_memory_check_leaves_out_the_frozen_weights_gradients_and_optimizer_state(monkeypatch):
    from mtnlg_cli.config import load_config
    from mtnlg_cli.planning.planner import layout_from_config, memory_per_gpu
    from mtnlg_cli.training import memory

    config = load_config({"model": {"num_layers": 24, "hidden_size": 1024, "num_heads": 16, "seq_length": 64,
                                    "max_position_embeddings": 64, "vocab_size": 1000},
                          "train": {"micro_batch_size": 1, "global_batch_size": 1}})
    full = memory_per_gpu(config, layout_from_config(config, 1))
    frozen = full.total - full.gradients - full.optimizer
    monkeypatch.setattr(memory, "available_memory", lambda device: (int(frozen * 1.1), "of RAM available"))
    memory.check_memory(config, 1, 1, torch.device("cpu"), frozen_weights=True)  # LoRA fits
    with pytest.raises(memory.DoesNotFit, match="the largest part is the optimizer state"):
        memory.check_memory(config, 1, 1, torch.device("cpu"))  # training every weight does not


def test_a_device_given_as_data_is_refused_before_it_is_read():
    with pytest.raises(MtnlgError, match="cannot read fine-tuning examples from /dev/zero: it is not a regular file"):
        read_examples(Path("/dev/zero"), STYLE, BadLines())
