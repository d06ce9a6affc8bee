"""Megatron-Core's side of the Megatron interop tests: GPTModels built as Megatron-LM builds them, the args
namespace it saves, and the ranks of a tensor- and pipeline-parallel run (started by tests/test_megatron_core.py).

megatron-core 0.16 assumes CUDA in a few places that a CPU run reaches; each accommodation is named where it is
made: the local attention's scratch buffer (a CUDA-only global) gets a CPU one, the fused bias-GeLU and
bias-SwiGLU (compiled with torch.compile at import) run eagerly, dropout RNG forks are disabled (Megatron's
inference tracker), the rotary embedding's frequencies, which Megatron moves to the current CUDA device, stay on
CPU, and in a pipeline-parallel run so does the tied embedding, which Megatron moves to CUDA to all-reduce it
between the first and last stage. Its torch_dist writer needs CUDA as well, so checkpoints that Megatron saves here go
through its own state dict conversion and save planner with torch's synchronous file writer: the save strategy
that mtnlg's export uses.
"""

from __future__ import annotations

import argparse
import os
import signal
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def megatron_lm_args(**model) -> argparse.Namespace:
    """The kind of namespace Megatron-LM saves: its enums and signal values, torch dtypes, no real vocab size."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(**{
        "kv_channels": model["hidden_size"] // model["num_attention_heads"], "num_query_groups": 1,
        "group_query_attention": False, "position_embedding_type": "learned_absolute", "add_position_embedding": True,
        "rotary_base": 10000, "rotary_percent": 1.0, "use_rope_scaling": False, "rope_scaling_factor": 8.0,
        "normalization": "LayerNorm", "layernorm_epsilon": 1e-5, "layernorm_zero_centered_gamma": False,
        "swiglu": False, "add_bias_linear": True, "add_qkv_bias": True, "bias_gelu_fusion": True,
        "bias_swiglu_fusion": True, "untie_embeddings_and_output_weights": False, "num_experts": None,
        "hidden_dropout": 0.1, "attention_dropout": 0.1, "init_method_std": 0.02, "vocab_size": None,
        "make_vocab_size_divisible_by": 128, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "seq_length": 32, "params_dtype": torch.float32, "bf16": False, "fp16": False,
        "attention_backend": AttnBackend.auto, "model_type": ModelType.encoder_or_decoder,
        "exit_signal": signal.SIGTERM, "tokenizer_type": "GPTSentencePieceTokenizer", "ckpt_format": "torch_dist",
        "consumed_train_samples": 3200, "iteration": 7, "transformer_impl": "local", **model})


def megatron_gpt(args: argparse.Namespace, pre_process: bool = True, post_process: bool = True):
    """Megatron-Core's GPTModel as Megatron-LM builds it from `args` (its core_transformer_config_from_args copies
    the arguments with TransformerConfig's names; the fused bias-GeLU follows bias_gelu_fusion)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels",
             "layernorm_epsilon", "layernorm_zero_centered_gamma", "add_bias_linear", "add_qkv_bias",
             "hidden_dropout", "attention_dropout", "normalization", "init_method_std")
    family = ({"activation_func": torch.nn.functional.silu, "gated_linear_unit": True,
               "bias_activation_fusion": getattr(args, "bias_swiglu_fusion", True)} if args.swiglu
              else {"bias_activation_fusion": args.bias_gelu_fusion})
    config = TransformerConfig(**{name: getattr(args, name) for name in names}, **family,
                               num_query_groups=args.num_query_groups if args.group_query_attention else None,
                               pipeline_dtype=args.params_dtype,
                               tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                               pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                               use_cpu_initialization=True)
    return GPTModel(config, get_gpt_layer_local_spec(normalization=args.normalization),
                    vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                    pre_process=pre_process, post_process=post_process,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
                    rope_scaling_factor=args.rope_scaling_factor,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights).eval()


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    length = tokens.shape[1]
    mask = torch.ones(1, 1, length, length, dtype=torch.bool).triu(1)  # True: masked, as Megatron-LM passes it
    with torch.no_grad():
        return model(tokens, torch.arange(length)[None], attention_mask=mask)


def import_megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes that Apex and Transformer Engine are absent
        import megatron.core  # noqa: F401


@contextmanager
def megatron_on_cpu(tensor_parallel: int = 1, pipeline_parallel: int = 1, rank: int = 0,
                    store=None) -> Iterator[None]:
    """Megatron-Core's parallel state in a gloo group of tensor_parallel * pipeline_parallel processes."""
    import torch._dynamo
    import torch.distributed as dist

    import_megatron()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.utils import GlobalMemoryBuffer

    class CpuScratch(GlobalMemoryBuffer):
        def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
            return torch.empty(tensor_shape, dtype=dtype)

    world = tensor_parallel * pipeline_parallel
    dist.init_process_group("gloo", store=store or dist.HashStore(), rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    saved = parallel_state._GLOBAL_MEMORY_BUFFER, torch._dynamo.config.disable, torch.cuda.current_device
    parallel_state._GLOBAL_MEMORY_BUFFER, torch._dynamo.config.disable = CpuScratch(), True
    torch.cuda.current_device = lambda: "cpu"  # where the rotary embedding moves its frequencies
    try:
        yield
    finally:
        parallel_state._GLOBAL_MEMORY_BUFFER, torch._dynamo.config.disable, torch.cuda.current_device = saved
        initialize_rng_tracker(force_reset=True)
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


FAMILIES = ("gpt", "llama")


def save_parallel_rank(rank: int, root: str) -> None:
    """One rank of a tensor-parallel 2 x pipeline-parallel 2 run: for each family, builds its part of a random
    4-layer GPTModel and saves it both as Megatron-LM does: collectively as torch_dist into
    ROOT/FAMILY/dist/iter_0000001, and as this rank's
    ROOT/FAMILY/torch/iter_0000001/mp_rank_TT_PPP/model_optim_rng.pt."""
    import torch.distributed as dist

    from mtnlg_cli.convert.megatron_core import synchronous_save_strategy

    torch.Tensor.cuda = lambda self, *_, **__: self  # the stages' all-reduce of the tied embedding
    with megatron_on_cpu(2, 2, rank, dist.FileStore(os.path.join(root, "store"), 4)):
        from megatron.core import dist_checkpointing, parallel_state

        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        tensor_rank = parallel_state.get_tensor_model_parallel_rank()
        stage = parallel_state.get_pipeline_model_parallel_rank()
        for family in FAMILIES:
            args = parallel_args(family)
            torch.manual_seed(0)  # the same master weights on every rank, each rank keeping its slice
            model = megatron_gpt(args, first, last)
            with torch.no_grad():
                generator = torch.Generator().manual_seed(rank)
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
                if model.share_embeddings_and_output_weights:
                    embedding = model.shared_embedding_or_output_weight()
                    if not first:  # the last stage's tied copy: the first stage's
                        embedding.zero_()
                    dist.all_reduce(embedding, group=parallel_state.get_embedding_group())
            common = {"args": args, "checkpoint_version": 3.0, "iteration": 1}
            dist_checkpointing.save({**common, "model": model.sharded_state_dict()},
                                    os.path.join(root, family, "dist", "iter_0000001"),
                                    sharded_strategy=synchronous_save_strategy(),
                                    content_metadata=dict(CONTENT_METADATA))
            folder = os.path.join(root, family, "torch", "iter_0000001", f"mp_rank_{tensor_rank:02d}_{stage:03d}")
            os.makedirs(folder)
            torch.save({**common, "model": model.state_dict_for_save_checkpoint()},
                       os.path.join(folder, "model_optim_rng.pt"))


def parallel_args(family: str) -> argparse.Namespace:
    """A 4-layer GPT, or a Llama-family model (rotary positions, RMSNorm, SwiGLU, two key/value heads for four
    query heads, an untied head, no linear biases), as a tensor-parallel 2 x pipeline-parallel 2 run saves it."""
    llama = {"position_embedding_type": "rope", "add_position_embedding": False, "normalization": "RMSNorm",
             "swiglu": True, "group_query_attention": True, "num_query_groups": 2, "ffn_hidden_size": 96,
             "untie_embeddings_and_output_weights": True, "add_bias_linear": False, "add_qkv_bias": False,
             "bias_gelu_fusion": False}
    model = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 192,
             "max_position_embeddings": 64, "padded_vocab_size": 768, "tensor_model_parallel_size": 2,
             "pipeline_model_parallel_size": 2, "hidden_dropout": 0.0, "attention_dropout": 0.0, "iteration": 1}
    return megatron_lm_args(**{**model, **(llama if family == "llama" else {})})
