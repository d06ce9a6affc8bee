"""An lm-evaluation-harness model, "mtnlg": run any harness task on an mtnlg checkpoint.

lm-eval 0.4 finds models in a registry that nothing outside lm-eval fills on its own (no plugin entry points),
so this module registers "mtnlg" when it is imported. From the shell, run the harness through it:

    python -m mtnlg_cli.evaluation.lm_eval_adapter --model mtnlg --model_args workspace=DIR --tasks lambada_openai,piqa

(any `lm_eval` arguments work). From Python: `import mtnlg_cli.evaluation.lm_eval_adapter`, then
`lm_eval.simple_evaluate(model="mtnlg", model_args="workspace=DIR", tasks=[...])`, or pass an `MtnlgLM`.

Model arguments: `workspace` (default: the current one), `checkpoint` (default: the latest), `batch_size`,
`device`, `max_length` (context; default the model's seq_length), `stride` (rolling log-likelihood windows;
default max_length: non-overlapping windows). Scoring is `mtnlg_cli.evaluation.scoring`'s, so `mtnlg eval` and
the harness agree on the same items. Needs `pip install lm-eval` (the `eval` extra).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install 'mtnlg-cli[eval]'") from None

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.evaluation import scoring as ev


@register_model("mtnlg")
class MtnlgLM(LM):
    def __init__(self, workspace: Optional[str] = None, checkpoint: Optional[str] = None, batch_size: int | str = 8,
                 device: Optional[str] = None, max_length: Optional[int] = None, stride: Optional[int] = None,
                 max_batch_size: Optional[int] = None) -> None:  # the harness passes max_batch_size; unused
        super().__init__()
        from mtnlg_cli.checkpoint import load_for_inference
        from mtnlg_cli.workspace import find_workspace

        ws = find_workspace(Path(workspace) if workspace else None)
        self._device = torch.device(device or "cuda")
        if self._device.type == "cuda" and not torch.cuda.is_available():
            if device:  # the harness asks for cuda:0 unless told otherwise
                logging.getLogger(__name__).warning("no CUDA device here: running %s on the CPU", device)
            self._device = torch.device("cpu")
        self.model, self.tokenizer, self.checkpoint = load_for_inference(
            ws, Path(checkpoint) if checkpoint else None, self._device)
        self.max_length = ev.context_length(self.checkpoint, self.model, int(max_length) if max_length else None)
        self.stride = int(stride or self.max_length)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.hash

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        start = self.tokenizer.document_start_id
        spans = [ev.pair_span(*ev.encode_pair(self.tokenizer, context, continuation, start), self.max_length)
                 for context, continuation in (request.args for request in requests)]
        scores = ev.score_spans(self.model, spans, self.batch_size)
        return [(float(lp), bool(greedy)) for lp, greedy in zip(scores.logprob, scores.greedy)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        documents = [self.tokenizer.encode(text) for (text,) in (request.args for request in requests)]
        logprobs = ev.document_logprobs(self.model, documents, self.tokenizer.document_start_id, self.max_length,
                                        self.stride, self.batch_size)
        return [float(lp) for lp in logprobs]

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, cut before the first `until` string; requests with the same settings share a
        batch of the generation engine."""
        from mtnlg_cli.config import SamplingSettings
        from mtnlg_cli.inference.engine import Generator

        generator = Generator(self.model, self.tokenizer)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            _, settings = request.args
            until = settings.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(stop for stop in until if stop)
            groups.setdefault((until, int(settings.get("max_gen_toks", 256))), []).append(index)
        results = [""] * len(requests)
        for (until, max_new_tokens), indices in groups.items():
            sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, stop=list(until))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                completions = generator.generate([requests[i].args[0] for i in batch], sampling)
                for i, completion in zip(batch, completions):
                    results[i] = completion.text
        return results


def main(argv: Optional[list[str]] = None) -> None:
    """`lm_eval`'s command line, with the "mtnlg" model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except MtnlgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
