"""`mtnlg plan`: exact sizes, Megatron's FLOPs and memory formulas, and the MT-NLG 530B paper's figures."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from mtnlg_cli.config import Config, ModelConfig
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.planning import planner
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.workspace import template_config
from conftest import run_cli


def mtnlg(recompute: bool = True) -> Config:
    return template_config("mt-nlg-530b", [f"train.activation_checkpointing={str(recompute).lower()}"])


@pytest.mark.parametrize("name, overrides", [
    ("tiny", []),
    ("gpt-125m", []),
    ("gpt-350m", []),
    ("llama-tiny", []),  # an untied head
    ("tiny", ["model.ffn_hidden_size=200", "model.vocab_size=1000", "model.make_vocab_size_divisible_by=64"]),
])
def test_parameter_count_equals_the_model(name, overrides):
    import torch

    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.model.architecture import Architecture

    model_config = template_config(name, overrides).model
    with torch.device("meta"):
        model = GPT(Architecture.from_model_config(model_config))
    assert Architecture.from_model_config(model_config).parameter_count() == model.num_parameters()
    layout = planner.Layout(1, 1, 1, 1, False)
    assert planner.parameters_per_gpu(model_config, layout) == model.num_parameters()


def test_parameters_per_gpu_shrink_with_tensor_and_pipeline_parallelism():
    model = mtnlg().model
    whole = Architecture.from_model_config(model).parameter_count()
    split = planner.parameters_per_gpu(model, planner.Layout(8, 35, 1, 1, True))
    assert whole / 280 < split < whole / 280 * 1.1  # the first stage also holds the embedding shard


@pytest.mark.parametrize("name", ["tiny", "gpt-1.3b", "mt-nlg-530b"])
@pytest.mark.parametrize("recompute", [False, True])
def test_flops_match_megatron_closed_form(name, recompute):
    config = template_config(name)
    batch = config.train.global_batch_size
    ours = planner.training_flops(config.model, batch * config.model.seq_length, recompute)
    assert ours == pytest.approx(planner.megatron_flops_formula(config.model, batch, recompute), rel=1e-12)


def test_recomputation_costs_a_third_more_layer_flops():
    model = ModelConfig(num_layers=8, hidden_size=256, num_heads=8, seq_length=128)
    ratio = planner.training_flops(model, 1024, True) / planner.training_flops(model, 1024, False)
    assert 1.25 < ratio < 4 / 3


def test_activation_memory_follows_korthikanti():
    model = ModelConfig(num_layers=2, hidden_size=1024, num_heads=16, max_position_embeddings=2048, seq_length=2048)
    s, b, h, a = 2048, 2, 1024, 16
    full = s * b * h * (34 + 5 * a * s / h)
    assert planner.activation_bytes_per_layer(model, b, 1, False, False) == pytest.approx(full)
    assert planner.activation_bytes_per_layer(model, b, 4, True, False) == pytest.approx(full / 4)
    assert planner.activation_bytes_per_layer(model, b, 4, False, False) == \
        pytest.approx(s * b * h * (10 + 24 / 4 + 5 * a * s / (h * 4)))
    assert planner.activation_bytes_per_layer(model, b, 4, False, True) == pytest.approx(2 * s * b * h)


def test_fsdp_shards_weights_gradients_and_optimizer_state():
    config = template_config("gpt-1.3b")
    plain = planner.memory_per_gpu(config, planner.Layout(1, 1, 8, 1, True))
    sharded = planner.memory_per_gpu(config, planner.Layout(1, 1, 8, 1, True, fsdp=True))
    for part in ("weights", "gradients", "optimizer"):
        assert getattr(sharded, part) == pytest.approx(getattr(plain, part) / 8)
    assert sharded.activations == plain.activations
    assert plain.weights + plain.gradients + plain.optimizer == pytest.approx(16 * Architecture.from_model_config(config.model).parameter_count())


def test_mt_nlg_530b_matches_the_paper():
    cluster = planner.Cluster.build(2240, "a100-80g")
    config = mtnlg(recompute=True)
    layout = planner.layout_from_config(config, 2240)
    assert (layout.tensor, layout.pipeline, layout.data) == (8, 35, 8)
    plan = planner.make_plan(config, layout, cluster, achieved_tflops=126)
    assert plan.parameters == pytest.approx(530e9, rel=0.01)
    assert plan.feasible, plan.problems
    assert plan.bubble == pytest.approx(34 / 240)
    assert plan.step_seconds == pytest.approx(60.1, rel=0.05)

    without = planner.make_plan(mtnlg(recompute=False), replace(layout, recompute=False), cluster)
    assert not without.feasible
    assert "recomputation" in without.problems[0]
    small = planner.make_plan(config, layout, planner.Cluster.build(2240, "a100-40g"))
    assert not small.feasible and "GiB" in small.problems[0]


def test_the_mt_nlg_530b_preset_is_the_papers_run():
    config = mtnlg()
    t, m = config.train, config.model
    tokens_per_batch = t.global_batch_size * m.seq_length
    assert t.train_tokens == 270e9 and t.rampup_batch_size == [32, 32, 12e9 / m.seq_length]
    assert t.lr == 5e-5 and t.min_lr == 0.1 * t.lr and t.lr_decay_style == "cosine"
    assert t.lr_warmup_iters * tokens_per_batch == pytest.approx(1e9, rel=0.01)
    assert t.lr_decay_iters * tokens_per_batch == pytest.approx(340e9, rel=0.001)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay, t.clip_grad) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert m.init_method_std == 4e-3 and t.activation_checkpointing and t.mixed_precision == "bf16"

    plan = planner.make_plan(config, planner.layout_from_config(config, 2240), planner.Cluster.build(2240),
                             achieved_tflops=126)
    assert plan.feasible and plan.step_seconds == pytest.approx(60.1, rel=0.01)
    assert plan.iterations == t.train_iters  # the preset's iterations are what 270B tokens take with the ramp
    assert any("ramps up from 32 to 1,920 over the first 12.0B tokens" in note for note in plan.notes)
    without_ramp = planner.make_plan(template_config("mt-nlg-530b", ["train.rampup_batch_size=null"]),
                                     plan.layout, plan.cluster, achieved_tflops=126)
    assert without_ramp.iterations == math.ceil(270e9 / tokens_per_batch) < plan.iterations
    assert without_ramp.days < plan.days


def test_search_finds_the_papers_layout_first():
    plans = planner.search_layouts(mtnlg(), planner.Cluster.build(2240, "a100-80g"))
    assert plans and all(plan.feasible and plan.layout.gpus == 2240 for plan in plans)
    steps = [round(p.step_seconds, 9) for p in plans]
    assert steps == sorted(steps)
    best = plans[0].layout
    assert (best.tensor, best.pipeline, best.data, best.micro_batch) == (8, 35, 8, 1)


def test_layouts_that_do_not_divide_are_flagged():
    config = template_config("tiny")  # 4 layers, 4 heads, global batch 16
    cluster = planner.Cluster.build(6)
    plan = planner.make_plan(config, planner.Layout(3, 1, 2, 8, False), cluster)
    text = " ".join(plan.problems)
    assert "TP=3 does not divide num_heads=4" in text
    assert "global batch 16 is not a multiple of micro-batch x DP = 16" not in text
    plan = planner.make_plan(config, planner.Layout(1, 3, 2, 3, False), cluster)
    text = " ".join(plan.problems)
    assert "PP=3 does not divide num_layers=4" in text and "global batch 16" in text
    with pytest.raises(MtnlgError, match="unknown GPU"):
        planner.Cluster.build(8, "a100-999g")


def test_plan_cli_json_and_errors(workspace):
    result = run_cli("plan", "--template", "mt-nlg-530b", "--gpus", "2240", "--tflops", "126", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["feasible"] and data["step_seconds"] == pytest.approx(60.1, rel=0.05)
    assert data["token_budget"] == 270_000_000_000  # the paper's run, from the preset
    at_full_batch = 270e9 / data["tokens_per_second"] / 86400
    assert at_full_batch < data["days"] < 1.05 * at_full_batch  # the ramp's small batches run less efficiently
    result = run_cli("plan", "--template", "mt-nlg-530b", "--gpus", "2240", "--tflops", "126", "--tokens", "1T",
                     "--json")
    assert json.loads(result.stdout)["token_budget"] == 10**12

    result = run_cli("plan", "--gpu", "h200", "--gpus", "2", "--search", cwd=workspace.root)
    assert result.returncode == 0, result.stderr
    assert "feasible, fastest first" in result.stdout and "h200" in result.stdout

    result = run_cli("plan", "--tokens", "lots", cwd=workspace.root)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --tokens='lots'")
    assert "Traceback" not in result.stderr


def test_pipeline_microbatches_set_the_bubble():
    config = template_config("tiny", ["parallel.pipeline_parallel=2", "parallel.pipeline_microbatches=4"])
    layout = planner.layout_from_config(config)
    assert (layout.pipeline, layout.data, layout.micro_batch) == (2, 1, 4)
    plan = planner.make_plan(config, layout, planner.Cluster.build(2, "h100-80g"))
    assert plan.feasible and plan.microbatches == 4 and plan.bubble == pytest.approx(1 / 4)


def test_inference_plan_counts_what_a_split_run_holds():
    """The cache figure is what a rank of a split run allocates (its stage's layers, its query groups); the weights
    are the model's over the layout, the first stage's embedding included."""
    import torch

    from mtnlg_cli.model.gpt import GPT, KVCache

    config = template_config("llama-tiny")  # grouped queries: the cache shrinks with the groups a rank keeps
    architecture = Architecture.from_model_config(config.model)
    whole = sum(p.numel() for p in GPT(architecture).parameters()) * 4
    assert planner.inference_memory(config.model, 1, 1, 3, 16, 4)[0] == whole
    tensor, pipeline = 2, 2
    weights, cache = planner.inference_memory(config.model, tensor, pipeline, 3, 16, 4)
    layers = range(config.model.num_layers // pipeline)
    shard = KVCache(architecture, 3, 16, layers=layers, query_groups=architecture.query_groups // tensor)
    assert cache == shard.keys.nbytes + shard.values.nbytes
    assert whole / (tensor * pipeline) < weights < whole / tensor


def test_inference_plan_finds_the_smallest_layout_that_serves_mt_nlg():
    """MT-NLG 530B in bf16 on H100-80G at batch 16 and 2,048 tokens: about 1,000 GiB of weights and 260 GiB of keys
    and values need at least 18 GPUs' usable memory; 105 layers (3 x 5 x 7) and TP within a node (1, 2, 4, 8) make
    20 the first count that splits, as TP=4 x PP=5."""
    config = mtnlg()
    cluster = planner.Cluster.build(64, "h100-80g")
    fits = planner.inference_layouts(config, cluster, batch=16, context=2048)
    usable = 80 * planner.GIB * planner.USABLE_MEMORY
    whole_weights, whole_cache = planner.inference_memory(config.model, 1, 1, 16, 2048, 2)
    assert whole_cache == 2 * 105 * 16 * 2048 * 20480 * 2
    at_least = -(-(whole_weights + whole_cache) // usable)
    smallest = next(fit for fit in fits if fit.fits)
    assert (smallest.tensor, smallest.pipeline) == (4, 5) and smallest.gpus >= at_least == 18
    assert not any(fit.fits for fit in fits if fit.gpus < smallest.gpus)
    assert all(fit.tensor <= 8 and 105 % fit.pipeline == 0 and fit.gpus <= 64 for fit in fits)


def test_plan_inference_cli(workspace):
    result = run_cli("plan", "--template", "mt-nlg-530b", "--inference", "--gpus", "64", "--gpu", "h100-80g",
                     "--batch", "16", "--context", "2048", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["smallest_fitting"]["tensor_parallel"], data["smallest_fitting"]["pipeline_parallel"]) == (4, 5)
    result = run_cli("plan", "--inference", "--search", cwd=workspace.root)
    assert result.returncode == 2 and result.stderr == "error: --search plans training; it does not apply to " \
        "--inference\n"
