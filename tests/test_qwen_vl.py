"""Qwen-VL (v1) against the official code's computation on a checkpoint with the official tensor names and shapes (tiny
dims), written as safetensors + config.json as the hub's files are:

* the tower's VisualAttention (fused in_proj laid out per head) against an explicit per-head computation, the
  Resampler against torch.nn.MultiheadAttention (the module the official Resampler runs) with the same weights, the
  whole tower against both;
* the LLM against transformers' Qwen2ForCausalLM on the same weights renamed (q/k/v biased, o and MLP not): logits and
  greedy tokens, which pins the decoder;
* the image features over each <img> ... </img> span (whatever ids the span holds), logits and greedy / beam tokens
  against Qwen2ForCausalLM fed the same merged embeddings; left-padded batches equal their rows alone;
* strict loading (a missing or an extra tensor is named), the save round trip onto the official names, the 9.6 B
  parameters of the real configuration, and the refusals before any work.

The official model is not in transformers (trust_remote_code), so the tower's reference is written out here from
visual.py's operations.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import polymodal as pm
from polymodal.models.qwen_vl import PRESETS, QwenVL, QwenVLConfig
from polymodal.weights.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")

START, END, PAD = 290, 291, 292
VISUAL = {"image_size": 56, "patch_size": 14, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.5, "n_queries": 9,
          "output_dim": 256, "image_start_id": START}
CONFIG = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "vocab_size": 300, "hidden_size": 256,
          "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 64,
          "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True,
          "max_position_embeddings": 8192, "seq_length": 2048, "use_dynamic_ntk": True, "use_logn_attn": True,
          "tie_word_embeddings": False, "bf16": False, "fp16": False, "fp32": True, "visual": VISUAL}
Q = VISUAL["n_queries"]


def official_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official names with the official shapes (visual.py, modeling_qwen.py)."""
    g = torch.Generator().manual_seed(seed)
    v, W, D = VISUAL, VISUAL["width"], CONFIG["hidden_size"]
    mlp, inter, V = int(W * v["mlp_ratio"]), CONFIG["intermediate_size"] // 2, CONFIG["vocab_size"]

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, n, bias=True):
        out = {f"{prefix}.weight": 1 + r(n)}
        if bias:
            out[f"{prefix}.bias"] = r(n)
        return out

    t = {"conv1.weight": r(W, 3, 14, 14), "positional_embedding": r(256, W, scale=0.5), **norm("ln_pre", W)}
    for i in range(v["layers"]):
        b = f"transformer.resblocks.{i}"
        t.update({**norm(f"{b}.ln_1", W), f"{b}.attn.in_proj.weight": r(3 * W, W, scale=0.3),
                  f"{b}.attn.in_proj.bias": r(3 * W), f"{b}.attn.out_proj.weight": r(W, W, scale=0.3),
                  f"{b}.attn.out_proj.bias": r(W), **norm(f"{b}.ln_2", W), f"{b}.mlp.c_fc.weight": r(mlp, W),
                  f"{b}.mlp.c_fc.bias": r(mlp), f"{b}.mlp.c_proj.weight": r(W, mlp), f"{b}.mlp.c_proj.bias": r(W)})
    p = "attn_pool"
    t.update({f"{p}.query": r(Q, D, scale=0.5), f"{p}.pos_embed": r(Q, D, scale=0.5), f"{p}.kv_proj.weight": r(D, W),
              f"{p}.attn.in_proj_weight": r(3 * D, D), f"{p}.attn.in_proj_bias": r(3 * D),
              f"{p}.attn.out_proj.weight": r(D, D), f"{p}.attn.out_proj.bias": r(D), **norm(f"{p}.ln_q", D),
              **norm(f"{p}.ln_kv", D), **norm("ln_post", D), "proj": r(D, D, scale=D ** -0.5)})
    out = {f"transformer.visual.{k}": x for k, x in t.items()}
    out["transformer.wte.weight"] = r(V, D, scale=0.5)
    for i in range(CONFIG["num_hidden_layers"]):
        h = f"transformer.h.{i}"
        out.update({**norm(f"{h}.ln_1", D, bias=False), f"{h}.attn.c_attn.weight": r(3 * D, D),
                    f"{h}.attn.c_attn.bias": r(3 * D), f"{h}.attn.c_proj.weight": r(D, D),
                    **norm(f"{h}.ln_2", D, bias=False), f"{h}.mlp.w1.weight": r(inter, D),
                    f"{h}.mlp.w2.weight": r(inter, D), f"{h}.mlp.c_proj.weight": r(D, inter)})
    out.update({**norm("transformer.ln_f", D, bias=False), "lm_head.weight": r(V, D)})
    return out


def write(path, tensors, config=CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tensors = official_tensors()
    return write(tmp_path_factory.mktemp("qwen-vl"), tensors), tensors


@pytest.fixture(scope="module")
def model(ckpt):
    return pm.load(ckpt[0])


# ------------------------------------------------------------------------------------------ the reference


def abs_pos(pos, n):
    """visual.py's get_abs_pos: a square grid of positions resampled bicubically to sqrt(n) x sqrt(n)."""
    src, tgt = math.isqrt(pos.shape[0]), math.isqrt(n)
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


def ln(t, prefix, x):
    return F.layer_norm(x, x.shape[-1:], t[f"{prefix}.weight"], t[f"{prefix}.bias"], 1e-6)


def visual_attention(t, prefix, x, heads):
    """VisualAttention.forward written out: in_proj viewed (..., heads, 3 * head_dim), split into q, k, v per head."""
    N, L, W = x.shape
    hd = W // heads
    mixed = F.linear(x, t[f"{prefix}.in_proj.weight"], t[f"{prefix}.in_proj.bias"]).view(N, L, heads, 3 * hd)
    q, k, v = (y.transpose(1, 2) for y in mixed.split(hd, dim=-1))  # (N, H, L, hd)
    probs = ((q / math.sqrt(hd)) @ k.transpose(-1, -2)).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(N, L, W)
    return F.linear(out, t[f"{prefix}.out_proj.weight"], t[f"{prefix}.out_proj.bias"])


def resampler(t, x):
    """The official Resampler: torch.nn.MultiheadAttention(query + pos, kv + resampled pos, kv), sequence-first."""
    D = t["attn_pool.query"].shape[1]
    mha = torch.nn.MultiheadAttention(D, D // 128)
    mha.load_state_dict({"in_proj_weight": t["attn_pool.attn.in_proj_weight"],
                         "in_proj_bias": t["attn_pool.attn.in_proj_bias"],
                         "out_proj.weight": t["attn_pool.attn.out_proj.weight"],
                         "out_proj.bias": t["attn_pool.attn.out_proj.bias"]})
    pos = t["attn_pool.pos_embed"]
    pos_k = abs_pos(pos, x.shape[1])
    kv = ln(t, "attn_pool.ln_kv", F.linear(x, t["attn_pool.kv_proj.weight"])).permute(1, 0, 2)  # (L, N, D)
    q = ln(t, "attn_pool.ln_q", t["attn_pool.query"])
    out = mha(q[:, None].repeat(1, x.shape[0], 1) + pos[:, None], kv + pos_k[:, None], kv, need_weights=False)[0]
    return out.permute(1, 0, 2)  # (N, Q, D)


def tower(tensors, px):
    t = {k[len("transformer.visual."):]: v for k, v in tensors.items() if k.startswith("transformer.visual.")}
    x = F.conv2d(px, t["conv1.weight"], stride=VISUAL["patch_size"]).flatten(2).transpose(1, 2)  # (N, L, W)
    x = ln(t, "ln_pre", x + abs_pos(t["positional_embedding"], x.shape[1]))
    for i in range(VISUAL["layers"]):
        b = f"transformer.resblocks.{i}"
        x = x + visual_attention(t, f"{b}.attn", ln(t, f"{b}.ln_1", x), VISUAL["heads"])
        h = F.gelu(F.linear(ln(t, f"{b}.ln_2", x), t[f"{b}.mlp.c_fc.weight"], t[f"{b}.mlp.c_fc.bias"]))
        x = x + F.linear(h, t[f"{b}.mlp.c_proj.weight"], t[f"{b}.mlp.c_proj.bias"])
    return ln(t, "ln_post", resampler(t, x)) @ t["proj"]


def qwen2(tensors):
    """transformers' Qwen2ForCausalLM on the LLM's weights: c_attn split into q/k/v, w2 the gate, w1 the up."""
    c = CONFIG
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"] // 2,
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_attention_heads"], rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=8192, tie_word_embeddings=False, use_sliding_window=False))
    D = c["hidden_size"]
    sd = {"model.embed_tokens.weight": tensors["transformer.wte.weight"], "model.norm.weight":
          tensors["transformer.ln_f.weight"], "lm_head.weight": tensors["lm_head.weight"]}
    for i in range(c["num_hidden_layers"]):
        h, m = f"transformer.h.{i}", f"model.layers.{i}"
        for name, w, b in zip("qkv", tensors[f"{h}.attn.c_attn.weight"].split(D),
                              tensors[f"{h}.attn.c_attn.bias"].split(D)):
            sd[f"{m}.self_attn.{name}_proj.weight"], sd[f"{m}.self_attn.{name}_proj.bias"] = w, b
        sd.update({f"{m}.self_attn.o_proj.weight": tensors[f"{h}.attn.c_proj.weight"],
                   f"{m}.input_layernorm.weight": tensors[f"{h}.ln_1.weight"],
                   f"{m}.post_attention_layernorm.weight": tensors[f"{h}.ln_2.weight"],
                   f"{m}.mlp.gate_proj.weight": tensors[f"{h}.mlp.w2.weight"],
                   f"{m}.mlp.up_proj.weight": tensors[f"{h}.mlp.w1.weight"],
                   f"{m}.mlp.down_proj.weight": tensors[f"{h}.mlp.c_proj.weight"]})
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


@pytest.fixture(scope="module")
def hf(ckpt):
    return qwen2(ckpt[1])


def prompt(prefix, suffix, images=1, span=None):
    """ids with `images` spans <img> + Q positions + </img> (by default the official tokenizer's: a path's bytes,
    then the padding)."""
    span = span if span is not None else [ord(ch) for ch in "a.jpg"] + [PAD] * (Q - 5)
    ids = list(prefix)
    for _ in range(images):
        ids += [START, *span, END, 10]
    return ids + list(suffix)


def merged(tensors, hf, ids, px):
    """The official merge: the embedding with image k's features at [a + 1, b) of the k-th span."""
    emb = hf.get_input_embeddings()(ids).clone()
    feats = tower(tensors, px)
    k = 0
    for row in range(ids.shape[0]):
        starts = (ids[row] == START).nonzero().flatten().tolist()
        ends = (ids[row] == END).nonzero().flatten().tolist()
        for a, b in zip(starts, ends):
            emb[row, a + 1:b] = feats[k]
            k += 1
    return emb


def pixels(n, seed=1):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ parts


@torch.no_grad()
def test_visual_attention_per_head_layout(model, ckpt):
    t = {k[len("transformer.visual."):]: v for k, v in ckpt[1].items() if k.startswith("transformer.visual.")}
    x = torch.randn(2, 16, VISUAL["width"])
    ours = model.visual.transformer.resblocks[1].attn(x)
    torch.testing.assert_close(ours, visual_attention(t, "transformer.resblocks.1.attn", x, VISUAL["heads"]),
                               atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_resampler_equals_multihead_attention(model, ckpt):
    t = {k[len("transformer.visual."):]: v for k, v in ckpt[1].items() if k.startswith("transformer.visual.")}
    x = torch.randn(3, 16, VISUAL["width"])  # 4 x 4 patches: the 3 x 3 grid of key positions is resampled
    torch.testing.assert_close(model.visual.attn_pool(x), resampler(t, x), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_tower(model, ckpt):
    px = pixels(2)
    torch.testing.assert_close(model.visual(px), tower(ckpt[1], px), atol=1e-4, rtol=1e-4)


def test_parameter_count_is_the_official_9_6b():
    with torch.device("meta"):
        m = QwenVL(PRESETS["Qwen/Qwen-VL-Chat"])
    total = sum(p.numel() for p in m.parameters())
    vit = sum(p.numel() for n, p in m.visual.named_parameters() if not n.startswith("attn_pool"))
    adapter = sum(p.numel() for p in m.visual.attn_pool.parameters())
    # the paper's table 1: ViT 1.9 B, adapter 0.08 B, LLM 7.7 B, 9.6 B in all
    assert (round(vit / 1e9, 1), round(adapter / 1e9, 2), round((total - vit - adapter) / 1e9, 1)) == (1.9, 0.08, 7.7)
    assert 9.6e9 <= total < 9.7e9


# ------------------------------------------------------------------------------------------ the decoder


@torch.no_grad()
def test_llm_equals_qwen2_for_causal_lm(model, hf):
    ids = torch.tensor([[3, 17, 45, 9, 120, 77, 5, 250]])
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    ours = model.generate(ids, max_new_tokens=8)
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert ours.tolist() == ref.tolist()


# ------------------------------------------------------------------------------------------ images


@torch.no_grad()
def test_features_fill_the_spans(model, ckpt, hf):
    ids = torch.tensor([prompt([1, 2, 3], [40, 41, 42], images=2)])
    px = pixels(2)
    ref = hf(inputs_embeds=merged(ckpt[1], hf, ids, px)).logits
    torch.testing.assert_close(model(ids, pixel_values=px), ref, atol=1e-4, rtol=1e-4)
    # the ids inside a span are overwritten: <imgpad> throughout (our processor's) gives the same logits
    pads = torch.tensor([prompt([1, 2, 3], [40, 41, 42], images=2, span=[PAD] * Q)])
    torch.testing.assert_close(model(pads, pixel_values=px), model(ids, pixel_values=px), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_greedy_and_beams(model, ckpt, hf):
    ids = torch.tensor([prompt([1, 2], [40, 41])])
    px = pixels(1, seed=3)
    emb = merged(ckpt[1], hf, ids, px)
    for beams in (1, 3):
        ours = model.generate(ids, max_new_tokens=6, pixel_values=px, num_beams=beams)
        ref = hf.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                          min_new_tokens=6, do_sample=False, num_beams=beams)
        assert ours[:, ids.shape[1]:].tolist() == ref.tolist(), beams


@torch.no_grad()
def test_batch_equals_rows_alone(model):
    rows = [prompt([1, 2, 3, 4, 5], [40]), prompt([7], [50, 51], images=2)]
    px = [pixels(1, seed=4), pixels(2, seed=5)]
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, pixel_values=torch.cat(px), pad_token_id=0)
    logits = model(ids, mask, torch.cat(px))
    for k, (r, p) in enumerate(zip(rows, px)):
        alone = torch.tensor([r])
        torch.testing.assert_close(logits[k, T - len(r):], model(alone, pixel_values=p)[0], atol=1e-4, rtol=1e-4)
        assert batch[k, T:].tolist() == model.generate(alone, max_new_tokens=5, pixel_values=p)[0, len(r):].tolist()


# ------------------------------------------------------------------------------------------ files


def test_strict_loading_names_the_tensor(tmp_path, ckpt):
    tensors = dict(ckpt[1])
    del tensors["transformer.visual.attn_pool.kv_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*attn_pool\.kv_proj\.weight"):
        pm.load(write(tmp_path / "missing", tensors))
    tensors = {**ckpt[1], "transformer.h.0.attn.masked_bias": torch.zeros(())}
    with pytest.raises(CheckpointError, match=r"unexpected.*transformer\.h\.0\.attn\.masked_bias"):
        pm.load(write(tmp_path / "extra", tensors))
    tensors = {**ckpt[1], "transformer.visual.proj": torch.zeros(8, 8)}
    with pytest.raises(CheckpointError, match=r"mis-shaped.*visual\.proj"):
        pm.load(write(tmp_path / "shape", tensors))


@torch.no_grad()
def test_save_round_trip_writes_the_official_names(tmp_path, model, ckpt):
    pm.save(model, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(saved) == sorted(ckpt[1])
    for k, t in ckpt[1].items():
        assert torch.equal(saved[k], t), k
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["visual"] == VISUAL
    again = pm.load(tmp_path / "out")
    ids = torch.tensor([prompt([1], [2])])
    torch.testing.assert_close(again(ids, pixel_values=pixels(1)), model(ids, pixel_values=pixels(1)))


# ------------------------------------------------------------------------------------------ refusals


@torch.no_grad()
def test_bad_inputs_are_clear_errors(model):
    px = pixels(1)
    good = prompt([1], [2])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(torch.tensor([good]))
    with pytest.raises(ValueError, match=r"2 image\(s\) in pixel_values but 1 <img> span"):
        model(torch.tensor([good]), pixel_values=pixels(2))
    with pytest.raises(ValueError, match="holds 9 positions"):
        model(torch.tensor([[1, START, PAD, PAD, END, 2]]), pixel_values=px)
    with pytest.raises(ValueError, match="needs its </img>"):
        model(torch.tensor([[1, START] + [PAD] * Q + [2]]), pixel_values=px)
    with pytest.raises(ValueError, match="needs its </img>"):
        model(torch.tensor([[1, END] + [PAD] * Q + [START, 2]]), pixel_values=px)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.tensor([good]), pixel_values=torch.randn(1, 3, 56, 50))
    with pytest.raises(ValueError, match="seq_length of 2048"):
        model.generate(torch.tensor([good]), max_new_tokens=2048, pixel_values=px)
    with pytest.raises(ValueError, match="not inputs_embeds"):
        model(inputs_embeds=torch.randn(1, 3, 256), pixel_values=px)


@pytest.mark.parametrize("change, message", [
    ({"visual": None}, "text-only LLM"),
    ({"kv_channels": 32}, "kv_channels 32"),
    ({"rotary_pct": 0.5}, "rotary_pct"),
    ({"visual": {**VISUAL, "image_start_id": 299}}, "image_start_id 299"),
    ({"visual": {**VISUAL, "output_dim": 128}}, "output_dim 128"),
])
def test_bad_configs_are_refused(tmp_path, ckpt, change, message):
    config = {k: v for k, v in {**CONFIG, **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=message):
        pm.load(write(tmp_path, ckpt[1], config))


def test_tiny_preset_builds_and_runs():
    m = pm.build("qwen_vl", "qwen-vl-tiny-test").eval()
    c: QwenVLConfig = m.config
    v = c.vision
    ids = torch.tensor([[1, v.image_start_id] + [v.image_pad_id] * v.n_queries + [v.image_end_id, 5]])
    out = m.generate(ids, max_new_tokens=3, pixel_values=torch.randn(1, 3, v.image_size, v.image_size))
    assert out.shape == (1, ids.shape[1] + 3)
    assert m.media_tokens(torch.zeros(2, 3, v.image_size, v.image_size)) == {v.image_pad_id: 2 * v.n_queries}
