"""The GPT model, readable top to bottom: Megatron-Turing NLG's architecture and today's families alike.

Token embeddings, `num_layers` pre-norm blocks (causal self-attention through `scaled_dot_product_attention`,
then an MLP), a final norm and an output head. The `Architecture` (architecture.py) chooses:

- positions: learned absolute embeddings (GPT-3, MT-NLG), or rotary embeddings applied to queries and keys
  (RoPE; Llama, Qwen, Mistral), optionally with Llama 3's frequency scaling;
- LayerNorm or RMSNorm; a GeLU MLP or a SwiGLU one (silu(gate(x)) * fc(x));
- multi-head or grouped-query attention (`num_query_groups` key/value heads shared by the query heads);
- biases on every linear layer, on q, k and v only, or none; an output head tied to the token embedding or its
  own `lm_head`.

Two layout choices serve the rest of the core:
- The fused QKV projection keeps each query group's rows together, [group, (its q heads | k | v), head_dim]
  (with one group per head this is Megatron-LM's checkpoint version 3 order, [head, (q|k|v), head_dim]).
  Splitting its output features across tensor-parallel ranks therefore hands each rank whole groups, and the
  attention code reads the number of groups from the tensor it gets rather than from the config, so parallel
  plans can shard the unchanged model.
- Generation passes a `KVCache` and the positions of the new tokens; training passes neither.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mtnlg_cli.model.architecture import Architecture

Rotary = tuple[torch.Tensor, torch.Tensor]  # cos and sin of each position's angles


class KVCache:
    """Keys and values of every layer for `max_length` positions, allocated once for a whole generation; one
    key/value head per query group.

    Rows normally fill together: `length` positions each, the next tokens written after them. Rows of different
    lengths can decode together (continuous batching): with `row_columns` set, each row's one new token goes to
    its own column, `length` is the number of columns in use, and the caller passes each row's position and a mask
    of its own columns to `GPT.forward`. `rows(...)` is a cache over some rows sharing this one's storage (to fill
    one row's prompt on its own), and `resized` and `move_row` reshape the set of rows as requests come and go.

    A model split across processes keeps a shard of it in each: `layers`, the layers of a pipeline stage, and
    `query_groups`, the groups of a tensor-parallel rank (default: all of them).
    """

    def __init__(self, config: Architecture, batch_size: int, max_length: int, device=None, dtype=torch.float32,
                 layers: Optional[range] = None, query_groups: Optional[int] = None):
        self.first_layer = layers.start if layers is not None else 0
        shape = self.shape(config, batch_size, max_length, layers, query_groups)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far; the model advances it after the last layer
        self.max_length = max_length
        self.row_columns: Optional[torch.Tensor] = None  # (batch,): where each row's next token goes, if per row

    @staticmethod
    def shape(config: Architecture, batch_size: int, max_length: int, layers: Optional[range] = None,
              query_groups: Optional[int] = None) -> tuple[int, ...]:
        """The shape of `keys` (and of `values`): (layers, rows, query groups, columns, head_dim)."""
        return (len(layers) if layers is not None else config.num_layers, batch_size,
                query_groups or config.query_groups, max_length, config.head_dim)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new keys and values of `layer` and returns all of them so far."""
        end = self.length + k.shape[2]
        layer -= self.first_layer
        if self.row_columns is None:
            self.keys[layer, :, :, self.length:end] = k
            self.values[layer, :, :, self.length:end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            self.keys[layer, rows, :, self.row_columns] = k[:, :, 0]
            self.values[layer, rows, :, self.row_columns] = v[:, :, 0]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) that writes into this one's storage, empty until its caller fills it."""
        view = copy.copy(self)
        view.keys, view.values = self.keys[:, start:stop], self.values[:, start:stop]
        view.length, view.row_columns = 0, None
        return view

    def resized(self, batch_size: int, max_length: int) -> "KVCache":
        """A new cache of `batch_size` rows and `max_length` columns holding what fits of this one's."""
        bigger = copy.copy(self)
        shape = list(self.keys.shape)  # (layers, rows, query groups, columns, head_dim)
        shape[1], shape[3] = batch_size, max_length
        rows, columns = min(batch_size, self.batch_size), min(max_length, self.max_length)
        bigger.keys = self.keys.new_zeros(shape)
        bigger.values = self.values.new_zeros(shape)
        bigger.keys[:, :rows, :, :columns] = self.keys[:, :rows, :, :columns]
        bigger.values[:, :rows, :, :columns] = self.values[:, :rows, :, :columns]
        bigger.max_length = max_length
        return bigger

    def move_row(self, source: int, target: int, columns: int) -> None:
        """Copies the first `columns` positions of row `source` over row `target`."""
        self.keys[:, target, :, :columns] = self.keys[:, source, :, :columns]
        self.values[:, target, :, :columns] = self.values[:, source, :, :columns]


def norm(config: Architecture) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)


class RotaryEmbedding(nn.Module):
    """The angles of rotary position embeddings: position x inverse frequency, for the rotating dimensions."""

    def __init__(self, config: Architecture):
        super().__init__()
        self.inverse_frequencies: torch.Tensor
        self.register_buffer("inverse_frequencies", rotary_inverse_frequencies(config), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rotary:
        """cos and sin of shape (length, rotary_dim), or (batch, length, rotary_dim) for per-row positions."""
        angles = positions.float()[..., None] * self.inverse_frequencies
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def rotary_inverse_frequencies(config: Architecture) -> torch.Tensor:
    """base^(-2i/d) for the rotating dimensions d, stretched for long contexts as Llama 3 does when it scales."""
    dim = config.rotary_dim
    inverse = 1.0 / config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaling = config.rope_scaling
    if scaling:
        # Llama 3: long wavelengths slow down by `factor`, short ones stay, and those between are blended
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inverse
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * inverse / factor + smooth * inverse
        inverse = torch.where(wavelength > original / low, inverse / factor,
                              torch.where(wavelength < original / high, inverse, blended))
    return inverse.float()


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotates the first rotary_dim dimensions of `x` (batch, heads, length, head_dim) in pairs (i, i + d/2), the
    layout of Hugging Face's and Megatron-Core's rotary embeddings."""
    cos, sin = rotary
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    dim = cos.shape[-1]
    rotating, passing = x[..., :dim], x[..., dim:]
    first, second = rotating.chunk(2, dim=-1)
    rotated = rotating * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passing), dim=-1) if passing.shape[-1] else rotated


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Architecture, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.head_dim = config.head_dim
        self.queries_per_group = config.num_heads // config.query_groups
        qkv_rows = (config.num_heads + 2 * config.query_groups) * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_rows, bias=config.add_bias_linear or config.add_qkv_bias)
        self.proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=config.add_bias_linear)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, attn_mask: Optional[torch.Tensor] = None,
                rotary: Optional[Rotary] = None) -> torch.Tensor:
        batch, length, _ = x.shape
        per_group = self.queries_per_group
        # (batch, length, groups, q heads of the group | k | v, head_dim): groups come from the tensor, so a
        # sharded qkv works unchanged
        qkv = self.qkv(x).view(batch, length, -1, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(batch, length, -1, self.head_dim).transpose(1, 2)
        k, v = qkv[:, :, :, per_group].transpose(1, 2), qkv[:, :, :, per_group + 1].transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_index, k, v)
        if attn_mask is None and past and length > 1:
            # a chunk after cached positions: each new token sees the cache and the new tokens up to itself
            attn_mask = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and past == 0 and length > 1,
            enable_gqa=per_group > 1,
        )
        y = y.transpose(1, 2).reshape(batch, length, -1)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: Architecture):
        super().__init__()
        h, f, bias = config.hidden_size, config.ffn_hidden_size, config.add_bias_linear
        self.gate = nn.Linear(h, f, bias=bias) if config.swiglu else None
        self.fc = nn.Linear(h, f, bias=bias)
        self.proj = nn.Linear(f, h, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            hidden = F.silu(self.gate(x)) * self.fc(x)
        else:
            hidden = F.gelu(self.fc(x), approximate="tanh")
        return self.dropout(self.proj(hidden))


class Block(nn.Module):
    def __init__(self, config: Architecture, layer_index: int):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, attn_mask: Optional[torch.Tensor] = None,
                rotary: Optional[Rotary] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, attn_mask, rotary)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: Architecture):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        learned = config.position_embedding_type == "learned_absolute"
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        self.rotary = None if learned else RotaryEmbedding(config)
        self.drop = nn.Dropout(config.dropout)
        # keyed by index, so that a pipeline stage that deletes the layers it does not own keeps the names
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_layers)})
        self.ln_f = norm(config)
        # the output projection when it is a module of its own; None: tied to the token embedding
        self.lm_head: Optional[nn.Module] = None
        if config.untie_embeddings_and_output_weights:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # recompute each block's activations in the backward pass instead of storing them (training only)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Megatron's initialisation: N(0, std) everywhere, output projections scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_method_std
        output_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith("attn.proj") or name.endswith("mlp.proj")
                nn.init.normal_(module.weight, mean=0.0, std=output_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                attn_mask: Optional[torch.Tensor] = None, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, length, vocab), or with `targets` the mean next-token cross-entropy over the targets
        that are not `IGNORE_INDEX` (fine-tuning ignores prompts and padding).

        `positions` ((length,), or (batch, length) for rows that start at different places) default to the
        positions after what `cache` already holds. `attn_mask`, where given, is a boolean mask broadcastable to
        (batch, heads, length, cached + length): True where a query may attend (`packed_attention_mask` gives the
        one for rows that pack several sequences). `last_only` returns the logits of
        the last position alone (batch, 1, vocab): all that generation needs from a prompt, without the output
        head's cost at every other position.

        A pipeline stage is this model with the parts it does not own deleted (`training.plans.pipeline_stage`):
        a stage after the first takes the previous stage's hidden states instead of token ids, and a stage
        without the final norm returns its hidden states.
        """
        length = tokens.shape[1]
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + length, device=tokens.device)
        x = tokens
        if not tokens.is_floating_point():
            x = self.wte(tokens)
            if self.wpe is not None:
                x = x + self.wpe(positions)
            x = self.drop(x)
        rotary = self.rotary(positions) if self.rotary is not None else None
        for layer in self.layers.values():
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, None, attn_mask, rotary, use_reentrant=False)
            else:
                x = layer(x, cache, attn_mask, rotary)
        if cache is not None:
            cache.length = past + length
        if self.ln_f is None:
            return x
        if last_only:
            x = x[:, -1:]
        x = self.ln_f(x)
        if targets is not None:
            weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
            if type(weight) in (nn.Parameter, torch.Tensor) and not torch.is_autocast_enabled(x.device.type):
                # (a sharded (DTensor) head or mixed precision takes the plain path below)
                return linear_cross_entropy(x.flatten(0, 1), weight, targets.reshape(-1))
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.wte.weight)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- what generation asks of a model (`inference.parallel.ParallelGPT`, the model split across processes,
    # answers the same) ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs."""
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache of `batch_size` rows and `max_length` positions for generating with this model."""
        return KVCache(self.config, batch_size, max_length, device=self.device, dtype=self.dtype)


def packed_attention_mask(positions: torch.Tensor) -> torch.Tensor:
    """The attention mask of rows that pack several sequences, each starting at position 0: causal within each
    sequence and never across two (block-diagonal). `positions` (batch, length) -> bool (batch, 1, length, length)."""
    sequence = (positions == 0).cumsum(dim=-1)
    same = sequence[:, :, None] == sequence[:, None, :]
    length = positions.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=positions.device).tril()
    return (same & causal)[:, None]


# ---------------------------------------------------------------------------------------------------------------
# The output head and the loss together, without the full logits.


LOSS_CHUNK_ROWS = 1024  # rows of logits alive at once: (1024 x vocab) stays in cache-friendly sizes
IGNORE_INDEX = -100  # a target that no loss counts (torch's cross_entropy default)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` (tokens x vocab) against the `targets` that are not
    `IGNORE_INDEX` (0 when every target is ignored).

    Equal to `F.cross_entropy(F.linear(hidden, weight), targets)`, but the logits are made chunk by chunk and
    never stored: the profile of a training step showed the (tokens x vocab) logits, their log-softmax, and
    the zero-filled gradient of both as the largest cost outside the matrix products. Ignored rows are dropped
    before the head, so a fine-tuning batch pays for the output head only where the loss counts.
    """
    ignored = targets == IGNORE_INDEX
    if ignored.any():
        kept = ~ignored
        hidden, targets = hidden[kept], targets[kept]
        if not len(targets):
            return hidden.sum() * 0.0 + weight.sum() * 0.0  # zero, with gradients (of zero) for both
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], LOSS_CHUNK_ROWS):
        rows = slice(start, start + LOSS_CHUNK_ROWS)
        logits = (hidden[rows] @ weight.t()).float()
        total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[rows, None]).squeeze(1)).sum()
    return total / hidden.shape[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """The forward pass also finds the gradients: each chunk's logits turn in place into softmax - one_hot,
    the gradient of the summed loss, which two matrix products carry to `hidden` and `weight` at once."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        # a frozen head (LoRA fine-tuning) needs no gradient: one matrix product fewer per chunk
        grad_weight = torch.empty_like(weight) if weight.requires_grad else None
        # one logits buffer for every chunk: a fresh (rows x vocab) tensor each time is page-faulted in anew
        buffer = hidden.new_empty(min(LOSS_CHUNK_ROWS, hidden.shape[0]), weight.shape[0])
        for start in range(0, hidden.shape[0], LOSS_CHUNK_ROWS):
            rows = slice(start, start + LOSS_CHUNK_ROWS)
            chunk, chunk_targets = hidden[rows], targets[rows, None]
            logits = torch.mm(chunk, weight.t(), out=buffer[:chunk.shape[0]]).float()
            target_logits = logits.gather(1, chunk_targets)
            peak = logits.amax(dim=1, keepdim=True)
            grad_logits = logits.sub_(peak).exp_()  # in place, every pass over the chunk counts
            sums = grad_logits.sum(dim=1, keepdim=True)
            total += (sums.log() + peak - target_logits).sum()
            grad_logits.div_(sums)  # softmax
            grad_logits.scatter_add_(1, chunk_targets, grad_logits.new_full(chunk_targets.shape, -1.0))
            grad_logits = grad_logits.to(hidden.dtype)
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if grad_weight is None:
                continue
            if start == 0:
                torch.mm(grad_logits.t(), chunk, out=grad_weight)
            else:
                grad_weight.addmm_(grad_logits.t(), chunk)
        count = hidden.shape[0]
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.count
        # in place: no fresh (vocab x hidden) tensor; a second backward through this graph fails autograd's
        # version check on the saved tensors instead of scaling them twice
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale.to(grad_weight.dtype))
        return grad_hidden.mul_(scale.to(grad_hidden.dtype)), grad_weight, None
