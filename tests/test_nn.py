"""Unit tests of the shared blocks against direct computations of their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.nn import (
    MLP,
    Attention,
    Block,
    KVCache,
    LearnedPosition2D,
    PatchEmbed,
    QuickGELU,
    RMSNorm,
    RoPE,
    SwiGLU,
    apply_rope,
    interpolate_pos_2d,
    padding_mask,
    sincos_1d,
    sincos_2d,
)

ATOL = 1e-5  # fp32, same math in a different order of operations


def naive_attention(attn: Attention, x, context=None, mask=None, causal=False):
    """softmax(q k^T / sqrt(Dh) + mask) v, written out with the block's own weights."""
    H, KV, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    B, T, _ = x.shape
    if attn.is_cross:
        q = attn.q(x)
        k, v = attn.kv(context).chunk(2, dim=-1)
    else:
        q, k, v = attn.qkv(x).split([H * Dh, KV * Dh, KV * Dh], -1)
    S = k.shape[1]
    q = q.view(B, T, H, Dh).transpose(1, 2)
    k = k.view(B, S, KV, Dh).transpose(1, 2).repeat_interleave(H // KV, 1)
    v = v.view(B, S, KV, Dh).transpose(1, 2).repeat_interleave(H // KV, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    if causal:
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, T, H * Dh))


def test_self_attention_matches_definition():
    attn = Attention(32, 4)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), atol=ATOL, rtol=0)


def test_causal_and_padding_masks():
    attn = Attention(32, 4, causal=True)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(attn(x), naive_attention(attn, x, causal=True), atol=ATOL, rtol=0)
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # left padding in the second row
    got = attn(x, mask=padding_mask(am))
    want = naive_attention(attn, x, mask=padding_mask(am), causal=True)
    torch.testing.assert_close(got[1, 2:], want[1, 2:], atol=ATOL, rtol=0)  # padded queries see nothing real
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)


def test_grouped_query_attention():
    attn = Attention(64, 8, num_kv_heads=2, bias=False)
    assert attn.qkv.out_features == 64 + 2 * 2 * 8
    x = torch.randn(1, 5, 64)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="multiple"):
        Attention(64, 8, num_kv_heads=3)


def test_cross_attention():
    attn = Attention(32, 4, context_dim=48)
    x, ctx = torch.randn(2, 3, 32), torch.randn(2, 9, 48)
    torch.testing.assert_close(attn(x, ctx), naive_attention(attn, x, ctx), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="context"):
        attn(x)


@pytest.mark.parametrize("width,split", [(32, False), (512, True)])
def test_qk_norm_normalizes_each_heads_queries_and_keys_before_rope(width, split):
    """qk_norm_eps: RMSNorm over Dh of each head's q and k (learned scales), then rotary positions, then attention:
    written out here with the block's own weights, on both projection paths (one fused product, or three).
    Tolerance 1e-4, not ATOL: F.rms_norm and the rsqrt written here round differently (~1e-6), and the normalized
    keys' unit scale sharpens the softmax, which carries that to ~1e-5 in the output."""
    torch.manual_seed(0)
    attn = Attention(width, 8, num_kv_heads=4, causal=True, qk_norm_eps=1e-6)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    H, KV, Dh = 8, 4, width // 8
    x = torch.randn(2, 12, width)
    rope = RoPE(Dh)(torch.arange(12)[None], dtype=x.dtype)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q, k, v = attn.qkv(x).split([H * Dh, KV * Dh, KV * Dh], -1)
    q = rms(q.view(2, 12, H, Dh), attn.q_norm.weight).transpose(1, 2)
    k = rms(k.view(2, 12, KV, Dh), attn.k_norm.weight).transpose(1, 2)
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(2, 1), v.view(2, 12, KV, Dh).transpose(1, 2).repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1),
                                                                     float("-inf"))
    want = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 12, width))
    assert attn.project_qkv(x, split=split, rope=rope)[0].shape == (2, H, 12, Dh)
    torch.testing.assert_close(attn(x, rope=rope), want, atol=1e-4, rtol=0)
    # cross-attention: the context's keys are normed too (Llama 3.2 Vision's cross-attention layers)
    cross = Attention(32, 4, context_dim=48, qk_norm_eps=1e-5)
    xs, ctx = torch.randn(2, 3, 32), torch.randn(2, 9, 48)
    qc = rms(cross.q(xs).view(2, 3, 4, 8), cross.q_norm.weight).transpose(1, 2)
    kc, vc = cross.kv(ctx).chunk(2, -1)
    kc = rms(kc.view(2, 9, 4, 8), cross.k_norm.weight).transpose(1, 2)
    out = ((qc @ kc.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ vc.view(2, 9, 4, 8).transpose(1, 2))
    torch.testing.assert_close(cross(xs, ctx), cross.proj(out.transpose(1, 2).reshape(2, 3, 32)), atol=1e-4, rtol=0)


def test_kv_cache_decoding_equals_full_pass():
    attn = Attention(32, 4, num_kv_heads=2, causal=True)
    x = torch.randn(2, 8, 32)
    full = attn(x)
    cache = KVCache(2, 2, 16, 8, dtype=x.dtype, device=x.device)
    parts = [attn(x[:, :5], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)
    assert cache.length == 8
    with pytest.raises(ValueError, match="full"):
        attn(torch.randn(2, 9, 32), cache=cache)


def test_mlp_and_activations():
    x = torch.randn(4, 16)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    mlp = MLP(16, 40, "quick_gelu")
    torch.testing.assert_close(mlp(x), mlp.fc2(QuickGELU()(mlp.fc1(x))))
    sw = SwiGLU(16, 24)
    torch.testing.assert_close(sw(x), sw.down_proj(F.silu(sw.gate_proj(x)) * sw.up_proj(x)))
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(4, 4, "nope")


def test_rmsnorm():
    n = RMSNorm(16, eps=1e-6)
    n.weight.data.uniform_()
    x = torch.randn(3, 16)
    torch.testing.assert_close(n(x), n.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert n.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16  # computed in fp32, returned in bf16


def test_patch_embed_is_linear_map_of_flattened_patches():
    pe = PatchEmbed(3, 24, 4)
    x = torch.randn(2, 3, 8, 12)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, h, w, P, P)
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 48)
    want = flat @ pe.proj.weight.reshape(24, 48).T + pe.proj.bias
    torch.testing.assert_close(pe(x), want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        pe(torch.randn(1, 3, 10, 8))


def test_sincos():
    e = sincos_1d(torch.arange(5), 8)
    assert e.shape == (5, 8)
    torch.testing.assert_close(e[3, 0], torch.tensor(math.sin(3.0)))
    torch.testing.assert_close(e[3, 4], torch.tensor(math.cos(3.0)))
    g = sincos_2d(2, 3, 16)
    assert g.shape == (6, 16)
    torch.testing.assert_close(g[4, :8], sincos_1d(torch.tensor([1]), 8)[0])  # patch 4 is row 1
    torch.testing.assert_close(g[4, 8:], sincos_1d(torch.tensor([1]), 8)[0])  # and column 1


def test_learned_2d_and_interpolation():
    p = LearnedPosition2D((3, 4), 8)
    p.row.data.normal_()
    p.col.data.normal_()
    e = p(3, 4)
    assert e.shape == (12, 8)
    torch.testing.assert_close(e[5, :4], p.row[1])
    torch.testing.assert_close(e[5, 4:], p.col[1])
    grid = torch.randn(16, 8)
    assert interpolate_pos_2d(grid, (4, 4), (4, 4)) is grid
    up = interpolate_pos_2d(grid, (4, 4), (6, 6))
    assert up.shape == (36, 8)
    const = torch.ones(16, 8)
    torch.testing.assert_close(interpolate_pos_2d(const, (4, 4), (7, 5), mode="bilinear"), torch.ones(35, 8))


def test_rope_is_relative():
    rope = RoPE(16)
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        cq, sq = rope(torch.tensor([[i]]))
        ck, sk = rope(torch.tensor([[j]]))
        return (apply_rope(q, cq[0, 0], sq[0, 0]) * apply_rope(k, ck[0, 0], sk[0, 0])).sum()

    torch.testing.assert_close(score(3, 1), score(10, 8), atol=1e-4, rtol=0)
    cos, sin = rope(torch.arange(4)[None])
    torch.testing.assert_close(apply_rope(q, cos[0, 2], sin[0, 2]).norm(), q.norm())


@pytest.mark.parametrize("causal", [False, True])
def test_keep_first_equals_slicing_the_full_output(causal):
    from polymodal.nn import Block

    block = Block(32, 4, 64, causal=causal)
    x = torch.randn(2, 7, 32)
    full = block(x)
    for n in (1, 3):
        torch.testing.assert_close(block(x, keep_first=n), full[:, :n], atol=ATOL, rtol=0)
    am = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    mask = padding_mask(am) | torch.eye(7, dtype=torch.bool)
    torch.testing.assert_close(block(x, mask, keep_first=2), block(x, mask)[:, :2], atol=ATOL, rtol=0)


def test_block_fast_path_matches_module_path():
    from polymodal.nn import Block

    block = Block(32, 4, 64, eps=1e-6).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.1)
    assert block._fusable
    x = torch.randn(3, 9, 32)
    with torch.inference_mode():
        fused = block(x)
    slow = block.train()(x)  # training mode takes the module path (dropout-free, so the same function)
    torch.testing.assert_close(fused, slow, atol=ATOL, rtol=0)
    assert not Block(32, 4, 64, act="quick_gelu")._fusable and not Block(32, 4, 64, causal=True)._fusable


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_and_fused_qkv_projections_agree(kv_heads):
    attn = Attention(32, 4, num_kv_heads=kv_heads)
    x = torch.randn(2, 5, 32)
    for a, b in zip(attn.project_qkv(x, split=True), attn.project_qkv(x, split=False)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_optimize_for_inference_keeps_outputs_names_and_training():
    from polymodal.nn import PackedLinear, optimize_for_inference

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(512, 8, 1024), torch.nn.Linear(512, 2048))
    narrow = torch.nn.Linear(64, 8)
    x = torch.randn(2, 9, 512)
    with torch.no_grad():
        want = model(x)
    keys = list(model.state_dict())
    optimize_for_inference(model), optimize_for_inference(narrow)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 5  # qkv, proj, fc1, fc2, the 512-wide one
    assert type(narrow) is torch.nn.Linear  # too narrow to gain
    assert list(model.state_dict()) == keys
    # wide outputs are laid out column-major for one-row products; the values and the shape stay
    fc1, fc2 = model[0].mlp.fc1.weight, model[0].mlp.fc2.weight  # 1024x512, 512x1024
    assert fc1.shape == (1024, 512) and fc1.t().is_contiguous() and fc2.is_contiguous()
    h = torch.randn(1, 512)  # a decode-shaped call: one row, the plain product on the column-major weight
    with torch.no_grad():
        lin = model[0].mlp.fc1
        torch.testing.assert_close(lin(h), F.linear(h, fc1.contiguous(), lin.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # training takes the plain path (gradients flow), and the packed copy follows the updated weights
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    assert model[1].weight.grad is not None
    opt.step()
    model.eval()
    with torch.no_grad():
        h = model[0](x)
        packed, plain = model[1](h), F.linear(h, model[1].weight, model[1].bias)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x), got)


def test_optimized_model_saves_and_loads_back(tmp_path):
    """Column-major weights (optimize_for_inference) are written as ordinary contiguous tensors by pm.save."""
    from dataclasses import replace

    import polymodal as pm
    from polymodal.models.llama import PRESETS

    torch.manual_seed(0)
    model = pm.build("llama", replace(PRESETS["llama-tiny-test"], hidden_size=256, intermediate_size=512)).eval()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        want = model(ids)
    pm.optimize_for_inference(model)
    assert model.layers[0].mlp.gate_proj.weight.t().is_contiguous()  # 512 x 256: laid out column-major
    pm.save(model, tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(pm.load(tmp_path / "saved")(ids), want, atol=1e-5, rtol=1e-5)


def test_optimize_for_inference_under_inference_mode():
    from polymodal.nn import PackedLinear, optimize_for_inference

    with torch.inference_mode():  # weights made here carry no version counter
        lin = torch.nn.Linear(512, 2048)
        x = torch.randn(3, 512)
        want = lin(x)
        optimize_for_inference(lin)
        assert isinstance(lin, PackedLinear)
        torch.testing.assert_close(lin(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lin(x[:0]), want[:0])  # an empty batch takes the plain path


@pytest.mark.parametrize("mkl_lacks_avx512", [False, True])
def test_one_row_products_take_the_kernel_measured_faster_on_this_kind_of_cpu(monkeypatch, mkl_lacks_avx512):
    """A one-row product of a 1024+-wide weight (a decode step) goes to MKL's GEMV where MKL runs its best kernels,
    and to the packed oneDNN product on AVX-512 CPUs that MKL runs with AVX2 (benchmarks/bench_linear_kernels.py);
    several rows are packed either way; the result is the plain product's."""
    from polymodal.nn import inference

    monkeypatch.setitem(inference._OPS, "mkl_lacks_avx512", mkl_lacks_avx512)
    calls = []
    plain = inference.F.linear
    monkeypatch.setattr(inference.F, "linear", lambda *a: calls.append(a[0].shape[0]) or plain(*a))
    lin = inference.optimize_for_inference(torch.nn.Linear(1024, 2048))
    with torch.no_grad():
        for rows in (1, 3):
            x = torch.randn(rows, 1024)
            torch.testing.assert_close(lin(x), plain(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-5)
    if inference._available():
        assert calls == ([] if mkl_lacks_avx512 else [1])
