"""Picking the next token: greedy, temperature, top-k, top-p, a repetition penalty and OpenAI's presence and
frequency penalties, seeded per call.

The settings are `mtnlg_cli.config.SamplingSettings` (temperature 0 is greedy; top_k 0, top_p 1,
repetition_penalty 1 and the presence and frequency penalties 0 are off; `seed` makes sampling reproducible, None
a fresh random seed). The presence and frequency penalties count the generated tokens only, as OpenAI's do.
"""

from __future__ import annotations

from typing import Optional

import torch

from mtnlg_cli.config import SamplingSettings


class Sampler:
    """Picks the next token of every row from its logits, following `SamplingSettings`."""

    def __init__(self, settings: SamplingSettings, tokenizer, prompts: list[list[int]], device: torch.device):
        self.settings = settings
        self.vocab_size = tokenizer.vocab_size  # the embedding is padded above it: those ids are never picked
        self.banned = frozenset(tokenizer.never_sampled)
        self.generator = torch.Generator(device=device)
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)
        self.seen: Optional[torch.Tensor] = None  # (batch, vocab): tokens in each row, for the repetition penalty
        if settings.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), self.vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                self.seen[row, torch.tensor(ids, device=device)] = True
        self.counts: Optional[torch.Tensor] = None  # (batch, vocab): generated tokens, for the OpenAI penalties
        if settings.presence_penalty or settings.frequency_penalty:
            self.counts = torch.zeros(len(prompts), self.vocab_size, device=device)

    def __call__(self, logits: torch.Tensor, argmaxes: Optional[list[int]] = None) -> list[int]:
        """The next token of each row. `argmaxes`, each row's `logits.argmax()` when the caller has it already (the
        C step computes it), is plain greedy decoding's answer whenever it is a token that may be picked: then no
        torch op runs, each of which is slow right after a decoding step has evicted the caches."""
        s = self.settings
        if (argmaxes is not None and s.temperature == 0 and self.seen is None and self.counts is None
                and max(argmaxes) < self.vocab_size and self.banned.isdisjoint(argmaxes)):
            return argmaxes
        logits = logits[:, :self.vocab_size].float()
        if self.banned:
            logits[:, list(self.banned)] = float("-inf")
        if self.seen is not None:
            # CTRL's penalty: a token already in the row is made less likely whatever its logit's sign
            penalized = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if self.counts is not None:
            logits = logits - s.frequency_penalty * self.counts - s.presence_penalty * (self.counts > 0)
        if s.temperature == 0:
            chosen = logits.argmax(dim=-1)
        else:
            chosen = self._sample(logits / s.temperature)
        if self.seen is not None:
            self.seen[torch.arange(len(chosen), device=chosen.device), chosen] = True
        if self.counts is not None:
            self.counts[torch.arange(len(chosen), device=chosen.device), chosen] += 1
        return chosen.tolist()

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if s.top_k:
            kth_best = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the ones before it already hold top_p of the mass; the best one always stays
            outside = probs.cumsum(dim=-1) - probs >= s.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator)[:, 0]
