"""Tensor parallelism, Megatron style (as vLLM and gpt-fast do it): what each rank holds of the GLM decoder.

    q/k/v_proj, gate_up_proj   column-parallel: the rank's heads' rows; gate_up its rows of gate and of up
    o_proj, down_proj          row-parallel: the matching input columns; the layer all-reduces each sublayer's
                               output (reference/glm.py GlmDecoderLayer, fast/glm.py FastGlmDecoderLayer)
    embed_tokens               vocab-parallel: the rank's rows of the vocabulary, 0 for ids outside them, then
                               an all-reduce (exact: one rank holds each id)
    lm_head                    vocab-parallel: its rows; the logits are all-gathered (`GatherLogits`)
    everything else            replicated: norms, the seed family's encoders, adapters and fusion, GLM-4.1V's ViT
KV heads are split too; with more ranks than KV heads each KV head is replicated on size / kv ranks (vLLM).
Under 4-bit weights (AWQ checkpoints, int4 at load) the intermediate columns are split in whole quantization
groups (unevenly where the group count does not divide: GLM-4.1V's 13696 = 107 groups of 128 -> 54 + 53),
so a rank's down_proj holds whole groups: AWQ tensors slice as they are, and int4 at load quantizes exactly
the groups one device would.

A rank's model is built on the meta device with its local shapes (`local_text_config`), and every sharded
tensor has a `Shard` saying which rows or columns of the full tensor it is, so loaders read only those
(safetensors `get_slice`) and seeded random init draws the full tensor and keeps its part (TP=2 presets equal
TP=1 ones). Both families share the GLM decoder, so nothing here is family-specific.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


@dataclass
class TensorParallel:
    """This rank's place in the tensor-parallel group. `group` (the torch.distributed process group of the
    collectives) is set once every rank has joined; without it a model can be built and loaded, not run."""
    rank: int
    size: int
    group: object = field(default=None, repr=False)
    host_group: object = field(default=None, repr=False)  # gloo: the per-step messages (parallel/worker.py)

    def __post_init__(self):
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {self.size!r}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a tensor-parallel group of {self.size}")

    def split(self, n: int, what: str, align: int = 1) -> tuple[int, int]:
        """(start, count) of this rank's share of n: equal, or in whole units of `align` (the earlier ranks
        one unit more where the units do not divide) when n is a multiple of align."""
        if align > 1 and n % align == 0 and n // align >= self.size:
            units, extra = divmod(n // align, self.size)
            return (self.rank * units + min(self.rank, extra)) * align, (units + (self.rank < extra)) * align
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={self.size}")
        count = n // self.size
        return self.rank * count, count

    def kv_heads(self, n: int) -> tuple[int, int]:
        """(first, count) of this rank's KV heads: a share of them, or one replicated head when ranks
        outnumber them (the query heads of a rank always read KV heads it holds)."""
        if n >= self.size:
            return self.split(n, "num_key_value_heads")
        if self.size % n:
            raise ValueError(f"tensor_parallel_size={self.size} must be a multiple of num_key_value_heads={n} "
                             "when it is larger (each KV head is replicated on size / kv ranks)")
        return self.rank // (self.size // n), 1

    def vocab(self, n: int) -> tuple[int, int]:
        """[start, end) of this rank's vocabulary rows: ceil(n / size) each, the last rank fewer."""
        per = -(-n // self.size)
        start = min(n, self.rank * per)
        return start, min(n, start + per)


@dataclass(frozen=True)
class Shard:
    """Which part of a full tensor a rank holds: `ranges` along `dim` (concatenated), of `full` there."""
    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int

    def full_shape(self, local: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.full if d == self.dim else n for d, n in enumerate(local))

    def local_shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sum(e - s for s, e in self.ranges) if d == self.dim else n for d, n in enumerate(full))

    def take(self, tensor) -> torch.Tensor:
        """This rank's part of a full tensor, or of a safetensors slice (only those bytes are read)."""
        index = [slice(None)] * (self.dim + 1)
        parts = []
        for s, e in self.ranges:
            index[self.dim] = slice(s, e)
            parts.append(tensor[tuple(index)])
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, self.dim)


def local_text_config(text: TextConfig, tp: TensorParallel, align: int = 1) -> TextConfig:
    """The decoder config of one rank: its query heads, KV heads and intermediate columns (in whole groups
    of `align`, see the module's docstring)."""
    heads = tp.split(text.num_attention_heads, "num_attention_heads")[1]
    kv = tp.kv_heads(text.num_key_value_heads)[1]
    inter = tp.split(text.intermediate_size, "intermediate_size", align)[1]
    return dataclasses.replace(text, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter)


class VocabParallelEmbedding(nn.Embedding):
    """An embedding table split by vocabulary rows: ids outside the rank's rows look up 0, and the sum over
    ranks (one all-reduce) is the full lookup, bit for bit. The parameter keeps nn.Embedding's name."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel):
        self.vocab_start, self.vocab_end = tp.vocab(num_embeddings)
        super().__init__(self.vocab_end - self.vocab_start, embedding_dim)
        self.tensor_parallel = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill_(outside[..., None], 0)
        return all_reduce(out, self.tensor_parallel)


class GatherLogits:
    """The vocab-parallel lm_head as the engine calls it: the rank's logits [N, rows], all-gathered into the
    full [N, vocab] on every rank (each samples alike; rank 0's tokens are the ones kept). It calls the
    model's current lm_head, so quantizing or swapping that module leaves it right."""

    def __init__(self, model: nn.Module, tp: TensorParallel, vocab: int):
        self.model, self.tensor_parallel, self.out_features = model, tp, vocab

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        local, tp = self.model.lm_head(hidden), self.tensor_parallel
        per = -(-self.out_features // tp.size)
        if local.shape[-1] < per:  # the last rank's share is short: pad it for the gather
            local = F.pad(local, (0, per - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in range(tp.size)]
        dist.all_gather(parts, local.contiguous(), group=tp.group)
        return torch.cat(parts, -1)[..., :self.out_features]


def all_reduce(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Sum x over the tensor-parallel ranks, in place (x itself when there are none)."""
    if tp is None or tp.size == 1:
        return x
    import torch.distributed as dist
    dist.all_reduce(x, group=tp.group)
    return x


def decoder(model: nn.Module) -> nn.Module:
    """The model's GLM decoder (both families have exactly one)."""
    from ..reference.glm import GlmModel
    found = [m for m in model.modules() if isinstance(m, GlmModel)]
    if len(found) != 1:
        raise TypeError(f"tensor parallelism shards a model with one GLM decoder; {type(model).__name__} has "
                        f"{len(found)}")
    return found[0]


def build_sharded(cls, config, tp: TensorParallel, align: int = 1) -> tuple[nn.Module, dict[str, Shard]]:
    """`cls(config)` for one rank on the meta device (local shapes, vocab-parallel embedding and lm_head),
    and the Shard of every tensor that is split, by parameter name. align: the 4-bit group size, if any."""
    text = config.text
    with torch.device("meta"):
        model = cls(dataclasses.replace(config, text=local_text_config(text, tp, align)))
        gm = decoder(model)
        tied = model.lm_head.weight is gm.embed_tokens.weight
        gm.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size, tp)
        start, end = gm.embed_tokens.vocab_start, gm.embed_tokens.vocab_end
        model.lm_head = nn.Linear(text.hidden_size, end - start, bias=False)
        if tied:
            model.lm_head.weight = gm.embed_tokens.weight
    model.tensor_parallel = tp
    for layer in gm.layers:
        layer.tensor_parallel = tp
    return model, shard_plan(model, text, tp, align)


def shard_plan(model: nn.Module, text: TextConfig, tp: TensorParallel, align: int = 1) -> dict[str, Shard]:
    """Parameter name -> Shard for a rank's meta model (`text`: the whole decoder's config)."""
    from ..reference.glm import GlmAttention, GlmMLP
    D, I = text.head_dim, text.intermediate_size
    q0, nq = tp.split(text.num_attention_heads, "num_attention_heads")
    k0, nk = tp.kv_heads(text.num_key_value_heads)
    i0, ni = tp.split(I, "intermediate_size", align)
    q_rows = Shard(0, ((q0 * D, (q0 + nq) * D),), text.num_attention_heads * D)
    kv_rows = Shard(0, ((k0 * D, (k0 + nk) * D),), text.num_key_value_heads * D)
    plan: dict[str, Shard] = {}
    for name, module in model.named_modules():
        if isinstance(module, GlmAttention):
            for proj, shard in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                plan[f"{name}.{proj}.weight"] = plan[f"{name}.{proj}.bias"] = shard
            plan[f"{name}.o_proj.weight"] = Shard(1, q_rows.ranges, q_rows.full)
        elif isinstance(module, GlmMLP):
            plan[f"{name}.gate_up_proj.weight"] = Shard(0, ((i0, i0 + ni), (I + i0, I + i0 + ni)), 2 * I)
            plan[f"{name}.down_proj.weight"] = Shard(1, ((i0, i0 + ni),), I)
    vocab = Shard(0, (tp.vocab(text.vocab_size),), text.vocab_size)
    embed = next(n for n, m in model.named_modules() if isinstance(m, VocabParallelEmbedding))
    plan[f"{embed}.weight"] = plan["lm_head.weight"] = vocab
    return plan
