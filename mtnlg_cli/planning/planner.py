"""Will a model and parallel layout fit, and how long will training take? Pure arithmetic, no torch.

The formulas are the ones Megatron's authors use to plan their own runs:
- FLOPs: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", eq. 3: an
  iteration of batch B, sequence s, l layers, hidden h and vocabulary V costs
  96·B·s·l·h²·(1 + s/6h + V/16lh) FLOPs with full activation recomputation (forward, backward at twice the
  forward, and the transformer layers' forward once more), and 72·B·s·l·h²·(1 + s/6h + V/12lh) without.
  We count the same matmuls from their parts, so a non-default FFN width is counted too.
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models":
  one layer stores s·b·h·(34 + 5as/h) bytes for a micro-batch of b (16-bit activations, a heads); tensor
  parallelism t divides the parts inside the attention and MLP blocks, s·b·h·(10 + 24/t + 5as/ht), and sequence
  parallelism divides the rest, s·b·h/t·(34 + 5as/h). Full recomputation stores only each layer's 2·s·b·h-byte
  input. Under 1F1B the first pipeline stage holds min(p, m) micro-batches in flight, GPipe holds all m.
- Weights, gradients and Adam state: 16 bytes a parameter (ZeRO's accounting: 16-bit weights and gradients,
  fp32 master weights, momentum and variance; fp32 training keeps 4 + 4 + 8), all three sharded across data-
  parallel ranks under FSDP.
- Pipeline bubble: (p - 1)/m of the ideal compute time for p stages and m micro-batches per pipeline.

Time: the assumed utilization `mfu` is the fraction of peak the GPUs sustain on the FLOPs they execute while
they compute (recomputation included, the bubble added on top). A measured end-to-end rate (`achieved_tflops`,
as papers report it: recomputation and bubble included) gives the step time of that layout directly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from mtnlg_cli.config import Config, ModelConfig, TrainConfig
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.model.architecture import Architecture, human_count
from mtnlg_cli.training.schedule import batch_phases, samples_after_steps

GIB = 2**30
USABLE_MEMORY = 0.9  # of a GPU's memory: the rest goes to the CUDA context, allocator fragmentation, buffers
DEFAULT_MFU = 0.45


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16 (fp16 where the GPU has no bf16), per GPU
    memory_gib: float
    gpus_per_node: int = 8


GPUS = {gpu.name: gpu for gpu in (
    GPU("v100-32g", 125.0, 32),  # fp16 tensor cores
    GPU("a100-40g", 312.0, 40),
    GPU("a100-80g", 312.0, 80),
    GPU("l40s", 362.0, 48),
    GPU("h100-pcie", 756.0, 80),
    GPU("h100-80g", 989.0, 80),
    GPU("h200", 989.0, 141),
    GPU("b200", 2250.0, 180),
    GPU("mi300x", 1307.0, 192),
)}
DEFAULT_GPU = "a100-80g"


def find_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise MtnlgError(f"unknown GPU {name!r}; choose one of: {', '.join(GPUS)} "
                         "(or give --peak-tflops and --gpu-memory)")
    return GPUS[name]


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    micro_batch: int
    recompute: bool
    sequence_parallel: bool = False
    fsdp: bool = False
    schedule: str = "1f1b"

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline * self.data

    def describe(self) -> str:
        extras = [name for name, on in (("recompute", self.recompute), ("SP", self.sequence_parallel),
                                        ("FSDP", self.fsdp)) if on]
        return (f"TP={self.tensor} x PP={self.pipeline} x DP={self.data}, micro-batch {self.micro_batch}"
                + (f" ({', '.join(extras)})" if extras else ""))


def layout_from_config(config: Config, gpus: Optional[int] = None) -> Layout:
    """The layout the config asks for on `gpus` GPUs (default: TP x PP x the config's data_parallel or 1)."""
    p = config.parallel
    model_parallel = p.tensor_parallel * p.pipeline_parallel
    if gpus is None:
        gpus = model_parallel * max(p.data_parallel, 1)
    data = p.data_parallel or max(gpus // model_parallel, 1)
    micro_batch = config.train.micro_batch_size
    per_rank = config.train.global_batch_size // data
    if p.pipeline_parallel > 1 and p.pipeline_microbatches and per_rank % p.pipeline_microbatches == 0:
        micro_batch = per_rank // p.pipeline_microbatches  # the pipeline splits each rank's share this many ways
    return Layout(p.tensor_parallel, p.pipeline_parallel, data, micro_batch,
                  config.train.activation_checkpointing, p.sequence_parallel, p.fsdp, p.pipeline_schedule)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def training_flops(model: ModelConfig, tokens: int, recompute: bool) -> float:
    """FLOPs of forward and backward over `tokens` tokens; `recompute` adds the layers' forward once more."""
    return Architecture.from_model_config(model).training_flops(tokens, model.seq_length, recompute)


def megatron_flops_formula(model: ModelConfig, batch: int, recompute: bool) -> float:
    """Narayanan et al. 2021's closed form (which assumes an FFN of 4h); the tests check ours against it."""
    b, s, l, h, v = batch, model.seq_length, model.num_layers, model.hidden_size, model.padded_vocab_size
    if recompute:
        return 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    return 72 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


# ---------------------------------------------------------------------------------------------------------------
# Memory


def bytes_per_parameter(mixed_precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter."""
    return (4, 4, 8) if mixed_precision == "no" else (2, 2, 12)


def parameters_per_gpu(model: ModelConfig, layout: Layout) -> int:
    """Parameters on the GPU of the largest pipeline stage (before any FSDP sharding).

    The first stage holds the embeddings, the last the final LayerNorm and the output head: an untied one's own
    weight, or (for p > 1) its own copy of the tied one, as in Megatron.
    """
    t, p = layout.tensor, layout.pipeline
    architecture = Architecture.from_model_config(model)
    layers = math.ceil(model.num_layers / p) * architecture.layer_parameter_count(t)
    embeddings = architecture.embedding_parameter_count(t)
    # an untied head is always its own weight; a tied one is a copy only on a last stage apart from the first
    own_head = p > 1 or not architecture.tied_output
    head = architecture.final_norm_parameter_count() + (architecture.output_head_parameter_count(t) if own_head else 0)
    if p == 1:
        return layers + embeddings + head
    return layers + max(embeddings, head)


def activation_bytes_per_layer(model: ModelConfig, micro_batch: int, tensor: int, sequence_parallel: bool,
                               recompute: bool) -> float:
    """Bytes one layer keeps for the backward pass of one micro-batch (Korthikanti et al. 2022, 16-bit).

    Their s·b·h·(10 + 24/t + 5as/ht) counts a GPT layer: 10sbh outside the tensor-parallel regions (the two norms'
    inputs, the inputs of qkv and of the MLP, two dropout masks) and 24sbh inside them, for queries, keys and
    values (2 + 2 + 2), the attention output (2) and the 4h MLP's two activations (8 + 8). Here the inside part
    follows the architecture: keys and values shrink to the query groups' share, a SwiGLU MLP of width f keeps
    gate, up, their product and the input of the down projection (4 x 2f), a GeLU MLP its two (2 x 2f).
    """
    s, b, h, a, t = model.seq_length, micro_batch, model.hidden_size, model.num_heads, tensor
    sbh = s * b * h
    if recompute:
        return 2 * sbh / (t if sequence_parallel else 1)
    kv_share = model.query_groups / model.num_heads
    mlp = (8 if model.swiglu else 4) * model.ffn_size / h
    inside = 2 + 4 * kv_share + 2 + mlp
    scores = 5 * a * s / h
    if sequence_parallel:
        return sbh / t * (10 + inside + scores)
    return sbh * (10 + inside / t + scores / t)


def microbatches_per_pipeline(global_batch: int, layout: Layout) -> float:
    return global_batch / (layout.micro_batch * layout.data)


@dataclass
class Memory:
    """Bytes per GPU on the busiest pipeline stage."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float  # the last stage's fp32 logits for the cross-entropy

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def memory_per_gpu(config: Config, layout: Layout) -> Memory:
    model = config.model
    params = parameters_per_gpu(model, layout)
    shards = layout.data if layout.fsdp else 1
    weight, grad, optimizer = (n * params / shards for n in bytes_per_parameter(config.train.mixed_precision))
    precision_scale = 2 if config.train.mixed_precision == "no" else 1  # Korthikanti counts 16-bit activations
    stored = activation_bytes_per_layer(model, layout.micro_batch, layout.tensor, layout.sequence_parallel,
                                        layout.recompute)
    # recomputing a layer materialises its full activations for one micro-batch at a time
    working = activation_bytes_per_layer(model, layout.micro_batch, layout.tensor, layout.sequence_parallel,
                                         False) if layout.recompute else 0.0
    micro_batches = max(1, math.floor(microbatches_per_pipeline(config.train.global_batch_size, layout)))
    in_flight = 1 if layout.pipeline == 1 else (micro_batches if layout.schedule == "gpipe"
                                                 else min(layout.pipeline, micro_batches))
    layers = math.ceil(model.num_layers / layout.pipeline)
    first_stage = (layers * in_flight * stored + working) * precision_scale
    last_stage = (layers * stored + working) * precision_scale  # one micro-batch in flight, plus the logits
    logits = 4 * model.seq_length * layout.micro_batch * model.padded_vocab_size / layout.tensor
    if layout.pipeline > 1 and first_stage > last_stage + logits:
        activations, logits = first_stage, 0.0
    else:
        activations = last_stage
    return Memory(weight, grad, optimizer, activations, logits)


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Cluster:
    gpus: int
    gpu: str  # a name from GPUS, or "custom"
    peak_tflops: float
    memory_gib: float
    gpus_per_node: int = 8

    @classmethod
    def build(cls, gpus: int, gpu: Optional[str] = None, peak_tflops: Optional[float] = None,
              memory_gib: Optional[float] = None) -> "Cluster":
        if gpus <= 0:
            raise MtnlgError(f"--gpus={gpus} must be positive")
        for name, value in (("--peak-tflops", peak_tflops), ("--gpu-memory", memory_gib)):
            if value is not None and value <= 0:
                raise MtnlgError(f"{name}={value} must be positive")
        base = find_gpu(gpu or DEFAULT_GPU)
        custom = gpu is None and (peak_tflops is not None or memory_gib is not None)
        return cls(gpus, "custom" if custom else base.name, peak_tflops or base.peak_tflops,
                   memory_gib or base.memory_gib, base.gpus_per_node)


@dataclass
class Plan:
    layout: Layout
    cluster: Cluster
    parameters: int
    parameters_per_gpu: int
    flops_per_token: float  # what the layout executes (with recomputation if it recomputes)
    model_flops_per_token: float  # without recomputation
    flops_per_token_recompute: float
    flops_per_iteration: float
    microbatches: float
    bubble: float
    memory: Memory
    activations_by_mode: dict[str, float]  # per GPU, for each recompute / sequence-parallel combination
    step_seconds: float
    tokens_per_iteration: int
    tokens_per_second: float
    hardware_utilization: float  # end to end, on executed FLOPs (what Megatron reports as TFLOP/s per GPU)
    model_utilization: float  # end to end, on model FLOPs (MFU, PaLM's definition)
    token_budget: int
    iterations: int
    days: float
    problems: list[str] = field(default_factory=list)  # each one makes the layout infeasible
    notes: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory"] = {**asdict(self.memory), "total": self.memory.total,
                          "capacity": self.cluster.memory_gib * GIB, "usable_fraction": USABLE_MEMORY}
        data["feasible"] = self.feasible
        data["achieved_tflops_per_gpu"] = self.hardware_utilization * self.cluster.peak_tflops
        return data


def layout_problems(config: Config, layout: Layout, cluster: Cluster) -> list[str]:
    """Why a layout cannot run at all (it does not divide); memory is checked separately."""
    m, t = config.model, config.train
    problems = []
    if Architecture.from_model_config(m).tensor_parallel_problem(layout.tensor):
        problems.append(f"TP={layout.tensor} does not divide num_heads={m.num_heads}, the ffn size {m.ffn_size} "
                        f"and the padded vocabulary {m.padded_vocab_size}")
    if m.num_layers % layout.pipeline:
        problems.append(f"PP={layout.pipeline} does not divide num_layers={m.num_layers} into equal stages")
    if layout.gpus != cluster.gpus:
        problems.append(f"TP x PP x DP = {layout.gpus} GPUs, but the cluster has {cluster.gpus}"
                        + (f" (not a multiple of TP x PP = {layout.tensor * layout.pipeline})"
                           if cluster.gpus % (layout.tensor * layout.pipeline) else ""))
    if t.global_batch_size % (layout.micro_batch * layout.data):
        problems.append(f"global batch {t.global_batch_size} is not a multiple of micro-batch x DP = "
                        f"{layout.micro_batch * layout.data}")
    elif t.rampup_batch_size and any(size % (layout.micro_batch * layout.data) for size in t.rampup_batch_size[:2]):
        problems.append(f"the batch ramp's start and increment {t.rampup_batch_size[:2]} are not multiples of "
                        f"micro-batch x DP = {layout.micro_batch * layout.data}")
    elif layout.pipeline > 1 and layout.schedule == "1f1b" and \
            microbatches_per_pipeline(t.global_batch_size, layout) < layout.pipeline:
        problems.append(f"1F1B needs at least PP={layout.pipeline} micro-batches per pipeline, the batch gives "
                        f"{microbatches_per_pipeline(t.global_batch_size, layout):g}")
    if layout.sequence_parallel and layout.tensor == 1:
        problems.append("sequence parallelism needs TP > 1")
    return problems


def make_plan(config: Config, layout: Layout, cluster: Cluster, mfu: float = DEFAULT_MFU,
              achieved_tflops: Optional[float] = None, token_budget: Optional[int] = None) -> Plan:
    """Every figure for one model, layout and cluster. `achieved_tflops` (measured end to end) overrides `mfu`."""
    if not 0 < mfu <= 1:
        raise MtnlgError(f"--mfu={mfu} must be in (0, 1]")
    if achieved_tflops is not None and achieved_tflops <= 0:
        raise MtnlgError(f"--tflops={achieved_tflops} must be positive")
    m, t = config.model, config.train
    tokens_per_iteration = t.global_batch_size * m.seq_length
    flops_iteration = training_flops(m, tokens_per_iteration, layout.recompute)
    model_flops_iteration = training_flops(m, tokens_per_iteration, False)
    microbatches = microbatches_per_pipeline(t.global_batch_size, layout)
    bubble = (layout.pipeline - 1) / microbatches
    if achieved_tflops is not None:
        step = flops_iteration / (cluster.gpus * achieved_tflops * 1e12)
    else:
        step = flops_iteration * (1 + bubble) / (cluster.gpus * cluster.peak_tflops * 1e12 * mfu)
    cluster_peak = cluster.gpus * cluster.peak_tflops * 1e12
    budget = token_budget or t.train_tokens or samples_after_steps(t.train_iters, t) * m.seq_length
    # every step at its own batch size: the ramp's small batches cost their FLOPs and a larger pipeline bubble
    phases = _batch_phases(math.ceil(budget / m.seq_length), t.global_batch_size, _ramp(t))
    run_seconds = sum(steps * step * _relative_step_time(config, layout, batch, flops_iteration)
                      for batch, steps in phases)
    memory = memory_per_gpu(config, layout)
    modes = {}
    for recompute in (False, True):
        for sp in ((False, True) if layout.tensor > 1 else (False,)):
            mode = replace(layout, recompute=recompute, sequence_parallel=sp)
            modes[("recompute" if recompute else "no recompute") + (", SP" if sp else "")] = \
                memory_per_gpu(config, mode).activations
    problems = layout_problems(config, layout, cluster)
    usable = cluster.memory_gib * GIB * USABLE_MEMORY
    if memory.total > usable:
        problem = (f"needs {memory.total / GIB:.1f} GiB per GPU, more than the {usable / GIB:.1f} GiB usable of "
                   f"{cluster.memory_gib:g} GiB")
        if not layout.recompute and memory_per_gpu(config, replace(layout, recompute=True)).total <= usable:
            problem += "; it fits with activation recomputation (--set train.activation_checkpointing=true)"
        problems.append(problem)
    notes = []
    if layout.tensor > cluster.gpus_per_node:
        notes.append(f"TP={layout.tensor} spans more than one {cluster.gpus_per_node}-GPU node: its all-reduces "
                     "cross the slower inter-node network")
    if m.vocab_size == "auto":
        notes.append(f"model.vocab_size is auto: the figures assume {m.known_vocab_size} pieces until preprocess "
                     "chooses the size from the corpus")
    if bubble > 0.25:
        notes.append(f"the pipeline bubble is {bubble:.0%} of compute: more micro-batches per pipeline "
                     "(a larger global batch or a smaller micro-batch) shrink it")
    if t.rampup_batch_size:
        start, _, ramp_samples = t.rampup_batch_size
        ramp_steps = sum(steps for batch, steps in phases if batch < t.global_batch_size)
        notes.append(f"the batch ramps up from {start:,} to {t.global_batch_size:,} over the first "
                     f"{human_count(ramp_samples * m.seq_length)} tokens ({ramp_steps:,} iterations); the days count "
                     "each iteration at its own batch size and pipeline bubble")
    return Plan(
        layout=layout, cluster=cluster,
        parameters=Architecture.from_model_config(m).parameter_count(),
        parameters_per_gpu=parameters_per_gpu(m, layout),
        flops_per_token=flops_iteration / tokens_per_iteration,
        model_flops_per_token=model_flops_iteration / tokens_per_iteration,
        flops_per_token_recompute=training_flops(m, tokens_per_iteration, True) / tokens_per_iteration,
        flops_per_iteration=flops_iteration, microbatches=microbatches, bubble=bubble,
        memory=memory, activations_by_mode=modes,
        step_seconds=step, tokens_per_iteration=tokens_per_iteration,
        tokens_per_second=tokens_per_iteration / step,
        hardware_utilization=flops_iteration / (step * cluster_peak),
        model_utilization=model_flops_iteration / (step * cluster_peak),
        token_budget=budget, iterations=sum(steps for _, steps in phases),
        days=run_seconds / 86400,
        problems=problems, notes=notes,
    )


def _ramp(train) -> Optional[tuple[int, ...]]:
    return tuple(train.rampup_batch_size) if train.rampup_batch_size else None


@functools.lru_cache(maxsize=8)
def _batch_phases(samples: int, global_batch_size: int, ramp: Optional[tuple[int, ...]]) -> list[tuple[int, int]]:
    """(batch size, iterations) to `samples` samples; cached, because a layout search plans the same run often."""
    train = TrainConfig(global_batch_size=global_batch_size, rampup_batch_size=list(ramp) if ramp else None)
    return batch_phases(0, samples, train)


def _relative_step_time(config: Config, layout: Layout, batch: int, full_flops: float) -> float:
    """The time of a step of `batch` samples relative to a step of the full global batch: its FLOPs, and the
    bubble of a pipeline with fewer micro-batches."""
    m, t = config.model, config.train
    if batch == t.global_batch_size:
        return 1.0
    flops = training_flops(m, batch * m.seq_length, layout.recompute)
    bubble = (layout.pipeline - 1) / microbatches_per_pipeline(batch, layout)
    full_bubble = (layout.pipeline - 1) / microbatches_per_pipeline(t.global_batch_size, layout)
    return flops / full_flops * (1 + bubble) / (1 + full_bubble)


def search_layouts(config: Config, cluster: Cluster, mfu: float = DEFAULT_MFU,
                   token_budget: Optional[int] = None) -> list[Plan]:
    """Every feasible (TP, PP, DP, micro-batch, recompute) layout of `cluster`, fastest first; among equally fast
    ones, the least model-parallel first (Megatron's advice: the smallest TP x PP that fits).

    TP stays within a node and divides the heads, PP divides the layers, and the micro-batch divides each data-
    parallel rank's share of the global batch. Sequence parallelism, FSDP and the schedule come from the config.
    """
    m, t, p = config.model, config.train, config.parallel
    plans = []
    for tensor in _divisors(m.num_heads):
        if tensor > cluster.gpus_per_node or cluster.gpus % tensor:
            continue
        for pipeline in _divisors(m.num_layers):
            if cluster.gpus % (tensor * pipeline):
                continue
            data = cluster.gpus // (tensor * pipeline)
            if t.global_batch_size % data:
                continue
            for micro_batch in _divisors(t.global_batch_size // data):
                for recompute in (False, True):
                    layout = Layout(tensor, pipeline, data, micro_batch, recompute,
                                    p.sequence_parallel and tensor > 1, p.fsdp, p.pipeline_schedule)
                    plan = make_plan(config, layout, cluster, mfu, token_budget=token_budget)
                    if plan.feasible:
                        plans.append(plan)
    # equal times: less model parallelism first (less communication, which this model does not price), then memory
    plans.sort(key=lambda plan: (round(plan.step_seconds, 9), plan.layout.tensor * plan.layout.pipeline,
                                 plan.memory.total))
    return plans


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------------------------------
# Serving: the model split TP x PP ways (`mtnlg generate|chat|eval|serve --num-processes`), as inference lays it
# out: each GPU holds its pipeline stage's layers and its tensor-parallel share of them, and the keys and values of
# those layers and of its own query groups.


@dataclass(frozen=True)
class InferenceFit:
    """One TP x PP layout for serving: bytes per GPU on its busiest pipeline stage."""

    tensor: int
    pipeline: int
    weights: float
    kv_cache: float
    usable: float  # what the weights and the cache may take of a GPU

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def to_dict(self) -> dict:
        return {"tensor_parallel": self.tensor, "pipeline_parallel": self.pipeline, "gpus": self.gpus,
                "weights_gib": self.weights / GIB, "kv_cache_gib": self.kv_cache / GIB,
                "total_gib": self.total / GIB, "usable_gib": self.usable / GIB, "fits": self.fits}


def inference_memory(model: ModelConfig, tensor: int, pipeline: int, batch: int, context: int,
                     bytes_per_value: int) -> tuple[float, float]:
    """(weights, keys and values) in bytes per GPU on the busiest pipeline stage, serving `batch` sequences of
    `context` tokens with `bytes_per_value`-byte weights and cache."""
    architecture = Architecture.from_model_config(model)
    weights = parameters_per_gpu(model, Layout(tensor, pipeline, 1, 1, False)) * bytes_per_value
    layers = math.ceil(model.num_layers / pipeline)
    cache = 2 * layers * batch * context * (architecture.query_groups // tensor) * architecture.head_dim
    return weights, cache * bytes_per_value


def inference_layouts(config: Config, cluster: Cluster, batch: int, context: int) -> list[InferenceFit]:
    """Every TP x PP layout on at most the cluster's GPUs that splits the model as inference does (TP within a node,
    dividing the heads and the query groups; PP dividing the layers), fewest GPUs first, then least TP (the least
    communication per token). The weights and the cache take train.mixed_precision's bytes per value."""
    if batch < 1 or context < 1:
        raise MtnlgError(f"batch {batch} and context {context} must be positive")
    model = config.model
    if context > model.max_position_embeddings:
        raise MtnlgError(f"a context of {context} tokens is more than model.max_position_embeddings="
                         f"{model.max_position_embeddings}")
    architecture = Architecture.from_model_config(model)
    bytes_per_value = bytes_per_parameter(config.train.mixed_precision)[0]
    fits = []
    for tensor in _divisors(architecture.query_groups):
        if tensor > min(cluster.gpus, cluster.gpus_per_node) or architecture.tensor_parallel_problem(tensor):
            continue
        for pipeline in _divisors(model.num_layers):
            if tensor * pipeline <= cluster.gpus:
                weights, cache = inference_memory(model, tensor, pipeline, batch, context, bytes_per_value)
                fits.append(InferenceFit(tensor, pipeline, weights, cache, cluster.memory_gib * GIB * USABLE_MEMORY))
    return sorted(fits, key=lambda fit: (fit.gpus, fit.tensor))
