"""Generation-based evaluation (`mtnlg eval --task generate`): answer each example with the chat template, and
score the answer against the reference.

Examples come in the fine-tuning formats (`finetune/examples.py`); the prompt is the conversation before its last
assistant turn, rendered as chat renders it, and the reference is that turn. Answers are greedy by default and end
where a chat reply ends. Three scores per example, averaged:

- **exact match**: the answer equals the reference after SQuAD's normalisation (lower case, no punctuation, no
  articles a/an/the, single spaces);
- **token F1**: SQuAD's F1 of the normalised words shared by answer and reference;
- **ROUGE-L**: the F-measure of the longest common subsequence of words (Lin, 2004), on lower-cased words as
  `rouge_score` splits them, except that each Han, kana or Hangul character counts as a word, so Chinese is scored
  too (`rouge_score`'s tokenizer drops everything outside a-z and 0-9).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from mtnlg_cli.config import SamplingSettings
from mtnlg_cli.finetune.examples import Example, prompt_and_reference

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORDS = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation) | set("，。！？、；：“”‘’（）《》【】…—·")


def words(text: str) -> list[str]:
    """Lower-cased words of `text`; each CJK character is a word of its own."""
    return _WORDS.findall(text.lower())


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answer_words(text: str) -> list[str]:
    return words(normalize_answer(text))


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = _answer_words(prediction), _answer_words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return 0.0
    previous = [0] * (len(expected) + 1)
    for word in predicted:  # the longest common subsequence, one row at a time
        current = [0]
        for j, other in enumerate(expected):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Answer:
    where: str
    reference: str
    prediction: str
    exact_match: float
    token_f1: float
    rouge_l: float
    tokens: int


def evaluate_generation(generator, examples: Sequence[Example], settings: SamplingSettings, batch_size: int = 8,
                        progress: Optional[Callable[[int, int], None]] = None) -> tuple[dict, list[Answer]]:
    """(mean scores, one `Answer` per example) of `generator`'s answers to `examples` (see the module docstring)."""
    from mtnlg_cli.inference.chat import render_chat, reply_stop_ids, reply_stop_strings

    tokenizer = generator.tokenizer
    items = [prompt_and_reference(example) for example in examples]
    prompts = [render_chat(tokenizer, messages) for messages, _ in items]
    if reply_stop_strings(tokenizer):
        settings = settings.replace(stop=[*settings.stop, *reply_stop_strings(tokenizer)])
    answers: list[Answer] = []
    batches = range(0, len(prompts), batch_size)
    for done, first in enumerate(batches, 1):
        completions = generator.generate(prompts[first:first + batch_size], settings,
                                         stop_token_ids=reply_stop_ids(tokenizer))
        for example, (_, reference), completion in zip(examples[first:], items[first:], completions):
            prediction = completion.text.strip()
            answers.append(Answer(example.where, reference, prediction, exact_match(prediction, reference),
                                  token_f1(prediction, reference), rouge_l(prediction, reference),
                                  len(completion.tokens)))
        if progress is not None:
            progress(done, len(batches))
    count = max(1, len(answers))
    metrics = {"examples": len(answers),
               "exact_match": sum(a.exact_match for a in answers) / count,
               "token_f1": sum(a.token_f1 for a in answers) / count,
               "rouge_l": sum(a.rouge_l for a in answers) / count,
               "answer_tokens": sum(a.tokens for a in answers) / count}
    return metrics, answers
