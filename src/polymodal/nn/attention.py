"""Multi-head attention on `torch.nn.functional.scaled_dot_product_attention`.

One block serves every family: self- and cross-attention, causal and padding masks, grouped-query heads
(fewer key/value heads than query heads, as in LLaMA 2/3 and Qwen2), rotary positions applied from the
outside, and a preallocated KV cache for generation.

Self-attention keeps q, k and v in one fused parameter (`qkv`): one matrix multiply on GPUs, and the layout
PyTorch's fused encoder-layer kernel takes (see `polymodal.nn.block`). On CPUs, for widths of 512 and more,
the three products run on contiguous row blocks of it instead: with MKL on the 2-core AVX2 machine of
benchmarks/, a 197x768 @ 768x2304 product took ~10% longer than three 768-wide ones (equal at 8x197 rows).
Checkpoints that store q/k/v apart are fused by the key map at load time (`polymodal.weights.keymap.Fuse`) and
split again when saving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.nn.norm import RMSNorm
from polymodal.nn.position import apply_rope

# Fewer rows than this take one fused q/k/v product on CPUs even at widths of 512 and more (a decode step: B rows)
SPLIT_MIN_ROWS = 8


class KVCache:
    """Preallocated key/value buffers for one attention layer: (B, KV, T_max, Dh) each.

    Writing at position `pos` never reallocates, so decoding costs no copies of the whole history.
    """

    static = False  # see StaticKVCache

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def over(cls, k: Tensor, v: Tensor, length: int) -> KVCache:
        """A cache over existing buffers (B, KV, T_max, Dh) whose first `length` positions are filled."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.length = k, v, length
        return cache

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index`, in that order (beam search)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)

    def moved(self, first: int, length: int, capacity: int) -> KVCache:
        """A new cache of `capacity` positions holding this one's filled positions from `first` on, moved to end
        at `length` (the serving engine's relayout; see `DecoderState.relayout`)."""
        B, KV, _, Dh = self.k.shape
        span = self.length - first
        k, v = self.k.new_zeros(B, KV, capacity, Dh), self.v.new_zeros(B, KV, capacity, Dh)
        k[:, :, length - span : length] = self.k[:, :, first : self.length]
        v[:, :, length - span : length] = self.v[:, :, first : self.length]
        return KVCache.over(k, v, length)

    @staticmethod
    def cat(caches: list[KVCache]) -> KVCache:
        """The rows of caches of one length and capacity, stacked in order."""
        if len({(c.length, c.max_len) for c in caches}) != 1:
            raise ValueError(f"caches of different layouts: lengths {[c.length for c in caches]}, capacities "
                             f"{[c.max_len for c in caches]}")
        return KVCache.over(torch.cat([c.k for c in caches]), torch.cat([c.v for c in caches]), caches[0].length)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, KV, T, Dh) and return everything cached so far (B, KV, L+T, Dh)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions requested, {self.max_len} preallocated")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class StaticKVCache(KVCache):
    """A KVCache for a decode step of fixed shapes, which a CUDA graph can capture once and replay for every token
    (`polymodal.generation.generate(..., static_cache=True)`): a one-position update writes at `index`, a (1,) tensor
    the caller advances between steps, and returns the whole buffers; the caller's mask (B, 1, 1, T_max) marks the
    filled positions, so nothing in the step depends on a Python-side length. Longer updates (a prefill) write
    as KVCache does."""

    static = True
    index: Tensor

    def reorder(self, index: Tensor) -> None:
        raise ValueError("a fixed-shape decode step keeps its rows in place (beam search uses KVCache)")

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if k.shape[2] != 1:
            return super().update(k, v)
        self.k.index_copy_(2, self.index, k)
        self.v.index_copy_(2, self.index, v)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head attention: x (B, T, D) [, context (B, S, Dc)] -> (B, T, D).

    Args:
        dim: model width D.
        num_heads: query heads H.
        num_kv_heads: key/value heads (grouped-query attention); defaults to H.
        head_dim: Dh; defaults to D // H.
        context_dim: set for cross-attention: keys and values come from a context of this width.
        bias: bias on the q/k/v projections.
        out_bias: bias on the output projection (defaults to `bias`).
        causal: each position attends only to itself and earlier ones.
        scale: softmax scale; defaults to 1/sqrt(Dh) (T5 uses 1).
        out_dim: width of the output projection; defaults to D (CLIP's attention pooling projects to P).
        qk_norm_eps: set to RMS-normalize each head's queries and keys (over Dh, learned scale, this epsilon) after
            the projection and before rotary positions: Llama 3.2 Vision's cross-attention layers, Qwen3.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        context_dim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        causal: bool = False,
        scale: float | None = None,
        out_dim: int | None = None,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = head_dim or dim // num_heads
        self.causal = causal
        self.scale = scale
        q_out, kv_out = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, q_out, bias=bias)
            self.kv = nn.Linear(context_dim, 2 * kv_out, bias=bias)
        else:
            self.qkv = nn.Linear(dim, q_out + 2 * kv_out, bias=bias)
        self.proj = nn.Linear(q_out, out_dim or dim, bias=bias if out_bias is None else out_bias)
        self.q_norm = RMSNorm(self.head_dim, eps=qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(self.head_dim, eps=qk_norm_eps) if qk_norm_eps is not None else None

    def project_qkv(self, x: Tensor, split: bool, rope: tuple[Tensor, Tensor] | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) -> q (B, H, T, Dh), k and v (B, KV, T, Dh) for self-attention, with rotary positions
        applied to q and k when `rope` = (cos, sin) each (B or 1, T, Dh) is given.

        split=True runs three products on contiguous row blocks of the fused weight (what CPUs get for widths of
        512 and more: with MKL, ViT-B/16 at batch 1 gains ~6% of its whole forward; equal at 8x197 rows); False, one
        fused product, whose q and k are then rotated together in one pass (a decode step is made of such small
        calls that their number matters)."""
        B, T, _ = x.shape
        H, KV, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        if split:
            sizes = [H * Dh, KV * Dh, KV * Dh]
            bias = self.qkv.bias.split(sizes) if self.qkv.bias is not None else (None,) * 3
            q, k, v = (F.linear(x, w, b).view(B, T, n, Dh).transpose(1, 2)
                       for w, b, n in zip(self.qkv.weight.split(sizes), bias, (H, KV, KV)))
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # (B, 1, T, Dh)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return q, k, v
        y = self.qkv(x).view(B, T, H + 2 * KV, Dh)
        if self.q_norm is not None:
            y = torch.cat([self.q_norm(y[:, :, :H]), self.k_norm(y[:, :, H:H + KV]), y[:, :, H + KV:]], dim=2)
        if rope is None:
            if KV == H:  # one permute, not split + 3 transposes: less per-call overhead
                return y.view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
            return y.transpose(1, 2).split([H, KV, KV], dim=1)
        qk = apply_rope(y[:, :, : H + KV], rope[0].unsqueeze(2), rope[1].unsqueeze(2))  # (B, T, H + KV, Dh)
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), y[:, :, H + KV:].transpose(1, 2)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of a context (B, S, Dc) -> (B, KV, S, Dh) each. A decoder that generates
        computes them once per input and passes the pair as `context` at every step."""
        B = context.shape[0]
        k, v = self.kv(context).view(B, -1, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return (k if self.k_norm is None else self.k_norm(k)), v

    def forward(
        self,
        x: Tensor,
        context: Tensor | tuple[Tensor, Tensor] | None = None,
        *,
        mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        keep_first: int | None = None,
    ) -> Tensor:
        """x (B, T, D); context (B, S, Dc) for cross-attention, or its `project_kv` pair; mask broadcastable to
        (B, H, T, S), bool (True = may attend) or additive float; rope = (cos, sin) each (B or 1, T, Dh) for the
        new positions.

        keep_first=n computes the output of the first n positions only -> (B, n, D); every position still
        serves as a key and value. A model that reads out only its first tokens (CLIP's class token) saves
        the rest of its last layer this way."""
        B, T, _ = x.shape
        H, KV, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            if rope is not None:
                raise ValueError("rotary positions belong to self-attention; this layer attends to a context")
            q = self.q(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
            if self.q_norm is not None:
                q = self.q_norm(q)
            k, v = context if isinstance(context, tuple) else self.project_kv(context)  # (B, KV, S, Dh) each
        else:
            # CPUs split wide projections of many rows (see project_qkv); for narrow ones, and for the few rows of a
            # decode step, the extra calls cost more than they save (a prepacked weight, see polymodal.nn.inference,
            # is faster as one product)
            split = (x.device.type == "cpu" and x.shape[-1] >= 512 and B * T > SPLIT_MIN_ROWS
                     and not getattr(self.qkv, "packed", False))
            q, k, v = self.project_qkv(x, split=split, rope=rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(k, v)
        gqa = {}
        if KV != H:
            if _sdpa_takes_gqa():  # the kernel reads each key/value head for its group: no copies of the cache
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(H // KV, dim=1)
                v = v.repeat_interleave(H // KV, dim=1)
        if keep_first is not None and keep_first < T:
            q, T = q[:, :, :keep_first], keep_first
            if mask is not None and mask.dim() == 4 and mask.shape[2] > 1:
                mask = mask[:, :, :keep_first]
        is_causal = False
        if self.causal:
            if mask is None and past == 0:
                # SDPA's fast path; for T queries and S >= T keys it aligns the triangle top-left, so query i
                # sees keys 0..i, which is right for the first T positions
                is_causal = T > 1 or k.shape[2] > 1
            # one new query may see every cached key: nothing to mask (a static cache's mask marks the filled ones)
            elif not (T == 1 and (mask is None or getattr(cache, "static", False))):
                S = k.shape[2]
                allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
                mask = allowed if mask is None else _merge_masks(mask, allowed)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, **gqa)
        return self.proj(out.transpose(1, 2).reshape(B, T, H * Dh))


def joint_attention(streams: list[tuple[Attention, Tensor]]) -> list[Tensor | None]:
    """One softmax over several token streams, each with its own projections: the joint attention of the MM-DiT
    (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", fig. 2a), where
    image and text tokens keep separate weights but attend to each other as one sequence.

    streams: (self-attention layer, x (B, T_i, D_i)) pairs of equal heads and head width. Each x goes through its
    layer's fused q/k/v (and q/k norms); the outputs, split back per stream, go through each layer's `proj`
    -> [(B, T_i, D_i)], None for a layer whose `proj` is None (a stream whose output is not read)."""
    first = streams[0][0]
    H, Dh = first.num_heads, first.head_dim
    qs, ks, vs, lengths = [], [], [], []
    for attn, x in streams:
        if attn.is_cross or (attn.num_heads, attn.num_kv_heads, attn.head_dim) != (H, H, Dh):
            raise ValueError("joint attention takes self-attention layers of equal heads and head width")
        q, k, v = attn.project_qkv(x, split=False)  # (B, H, T_i, Dh) each
        qs.append(q), ks.append(k), vs.append(v), lengths.append(x.shape[1])
    out = F.scaled_dot_product_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))  # (B, H, T, Dh)
    B = out.shape[0]
    parts = out.transpose(1, 2).reshape(B, sum(lengths), H * Dh).split(lengths, dim=1)
    return [None if attn.proj is None else attn.proj(p) for (attn, _), p in zip(streams, parts)]


_GQA: dict[str, bool] = {}


def _sdpa_takes_gqa() -> bool:
    """Whether this torch's SDPA groups query heads over shared key/value heads itself (`enable_gqa`, 2.5+)."""
    if "ok" not in _GQA:
        try:
            q, kv = torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 4)
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
            _GQA["ok"] = True
        except (TypeError, RuntimeError):
            _GQA["ok"] = False
    return _GQA["ok"]


def _merge_masks(mask: Tensor, allowed: Tensor) -> Tensor:
    """Combine a user mask (bool or additive) with a boolean causal pattern."""
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def padding_mask(attention_mask: Tensor) -> Tensor:
    """(B, S) with 1 for real tokens -> boolean (B, 1, 1, S) mask for `Attention`."""
    return attention_mask.bool()[:, None, None, :]


def causal_padding_mask(attention_mask: Tensor, num_queries: int) -> Tensor:
    """A decoder's mask for its newest `num_queries` positions: (B, S) with 1 for real tokens, covering past and new
    positions -> boolean (B, 1, T, S), True where a query may attend (causal and not padding).

    A left-padding position would see no key at all (its softmax would be 0/0 = NaN, and the NaN would reach
    real tokens through the next layer's values even at weight 0); it attends to itself instead. Its output is
    never read."""
    S, T = attention_mask.shape[1], num_queries
    past = S - T
    allowed = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).tril(diagonal=past)  # (T, S)
    mask = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    itself = torch.zeros(T, S, dtype=torch.bool, device=attention_mask.device)
    itself[torch.arange(T), past + torch.arange(T)] = True
    return mask | itself
