"""The checkpoint layer: key maps, strict loading, sharding, dtype, and refusing hostile files."""

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import polymodal as pm
from polymodal.weights import CheckpointError, Drop, Fuse, KeyMap, Rename, Transform, read_safetensors_header
from polymodal.weights.checkpoint import open_checkpoint
from polymodal.weights.loader import load_weights


def _tiny_vit_dir(tmp_path: Path) -> Path:
    model = pm.build("vit", "vit-tiny-test")
    d = tmp_path / "vit"
    pm.save(model, d)
    return d


def test_keymap_round_trip():
    km = KeyMap([
        Drop("buf.{i}"),
        Rename("enc.{i}.ln.{p}", "blocks.{i}.norm.{p}"),
        Fuse(("enc.{i}.q.w", "enc.{i}.k.w", "enc.{i}.v.w"), "blocks.{i}.qkv.w", sizes=(4, 2, 2)),
        Transform("proj", "proj.weight", to_model=lambda t: t.T, from_model=lambda t: t.T),
        Rename("wrap.{rest*}", "{rest*}"),
    ])
    ckpt = {
        "buf.0": torch.zeros(1),
        "enc.3.ln.weight": torch.randn(5),
        "enc.3.q.w": torch.randn(4, 3),
        "enc.3.k.w": torch.randn(2, 3),
        "enc.3.v.w": torch.randn(2, 3),
        "proj": torch.randn(3, 6),
        "wrap.a.b.c": torch.randn(2),  # a catch-all prefix rule claims every unmatched name when saving
    }
    steps, dropped = km.plan_load(ckpt)
    assert dropped == ["buf.0"]
    ours = {n: t for s in steps for n, t in zip(s.dst, s.fn([ckpt[k] for k in s.src]))}
    assert set(ours) == {"blocks.3.norm.weight", "blocks.3.qkv.w", "proj.weight", "a.b.c"}
    assert ours["blocks.3.qkv.w"].shape == (8, 3)
    back = {n: t for s in km.plan_save(ours) for n, t in zip(s.dst, s.fn([ours[k] for k in s.src]))}
    assert set(back) == set(ckpt) - {"buf.0"}
    for k, t in back.items():
        torch.testing.assert_close(t, ckpt[k])


def _inner_map() -> KeyMap:
    """A part's own map: a Drop, a Fuse with unequal sizes, a Transform, and a catch-all prefix."""
    return KeyMap([
        Drop("buf.{i}"),
        Rename("enc.{i}.ln.{p}", "blocks.{i}.norm.{p}"),
        Fuse(("enc.{i}.q.w", "enc.{i}.k.w", "enc.{i}.v.w"), "blocks.{i}.qkv.w", sizes=(4, 2, 2)),
        Transform("proj", "proj.weight", to_model=lambda t: t.T, from_model=lambda t: t.T),
        Rename("wrap.{rest*}", "{rest*}"),
    ])


def _inner_ckpt(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"buf.0": (1,), "enc.3.ln.weight": (5,), "enc.3.q.w": (4, 3), "enc.3.k.w": (2, 3), "enc.3.v.w": (2, 3),
              "proj": (3, 6), "wrap.a.b.c": (2,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _apply(steps, tensors: dict) -> dict:
    return {n: t for s in steps for n, t in zip(s.dst, s.fn([tensors[k] for k in s.src]))}


def _check_part(ours: dict, prefix: str, part: dict) -> None:
    """`ours` holds `part` (an inner checkpoint) under `prefix`, through the inner map's rules."""
    torch.testing.assert_close(ours[f"{prefix}blocks.3.norm.weight"], part["enc.3.ln.weight"], atol=0, rtol=0)
    torch.testing.assert_close(ours[f"{prefix}blocks.3.qkv.w"], torch.cat([part[f"enc.3.{n}.w"] for n in "qkv"]),
                               atol=0, rtol=0)
    torch.testing.assert_close(ours[f"{prefix}proj.weight"], part["proj"].T, atol=0, rtol=0)
    torch.testing.assert_close(ours[f"{prefix}a.b.c"], part["wrap.a.b.c"], atol=0, rtol=0)


def test_nested_keymap_round_trips_names_and_tensors():
    km = _inner_map().nested("part.", "sub.")
    part = _inner_ckpt(0)
    ckpt = {f"part.{k}": t for k, t in part.items()}
    steps, dropped = km.plan_load(ckpt)
    assert dropped == ["part.buf.0"]
    assert {s.src: s.dst for s in steps}[("part.enc.3.q.w", "part.enc.3.k.w", "part.enc.3.v.w")] == (
        "sub.blocks.3.qkv.w",)
    ours = _apply(steps, ckpt)
    assert set(ours) == {"sub.blocks.3.norm.weight", "sub.blocks.3.qkv.w", "sub.proj.weight", "sub.a.b.c"}
    _check_part(ours, "sub.", part)
    # the loader plans on meta tensors first: the same names and shapes come out without data
    meta = _apply(steps, {k: t.to("meta") for k, t in ckpt.items()})
    assert {k: t.shape for k, t in meta.items()} == {k: t.shape for k, t in ours.items()}
    back = _apply(km.plan_save(ours), ours)
    assert set(back) == set(ckpt) - {"part.buf.0"}
    for k, t in back.items():
        torch.testing.assert_close(t, ckpt[k], atol=0, rtol=0, msg=k)


def test_nested_maps_side_by_side_with_a_prefix_table():
    """Two mounts of one map (the same inner names under each, so a Fuse must not mix them), one spreading its part
    over two checkpoint prefixes as transformers 5.x spreads LLaMA's (`model.language_model.` and `lm_head.`),
    beside a rule of the composite's own and a name no rule claims."""
    inner = _inner_map()
    km = (KeyMap([Rename("head.w", "head.weight")])
          + inner.nested({"m.left.": "enc.", "left.": ""}, "left.")
          + inner.nested("right.", "r."))
    left, right = _inner_ckpt(1), _inner_ckpt(2)
    ckpt = {"head.w": torch.randn(2), "stray.x": torch.randn(3),
            **{(f"m.left.{k[4:]}" if k.startswith("enc.") else f"left.{k}"): t for k, t in left.items()},
            **{f"right.{k}": t for k, t in right.items()}}
    assert "m.left.3.q.w" in ckpt and "left.proj" in ckpt
    steps, dropped = km.plan_load(ckpt)
    assert sorted(dropped) == ["left.buf.0", "right.buf.0"]
    ours = _apply(steps, ckpt)
    assert {k for k in ours if not k.startswith(("left.", "r."))} == {"head.weight", "stray.x"}
    _check_part(ours, "left.", left)
    _check_part(ours, "r.", right)
    assert len(ours) == 2 + 4 + 4
    back = _apply(km.plan_save(ours), ours)
    assert set(back) == set(ckpt) - {"left.buf.0", "right.buf.0"}
    for k, t in back.items():
        torch.testing.assert_close(t, ckpt[k], atol=0, rtol=0, msg=k)


def test_nest_refuses_to_write_a_name_none_of_its_prefixes_holds():
    km = _inner_map().nested({"m.left.": "enc."}, "left.")
    with pytest.raises(ValueError, match="writes 'proj', which none of its checkpoint prefixes holds"):
        km.plan_save(["left.proj.weight"])
    with pytest.raises(ValueError, match="at least one checkpoint prefix"):
        KeyMap().nested({}, "x.")


def test_a_tensor_given_twice_is_refused():
    """`model.w` renamed onto the `w` a file also holds: the strict check names both instead of taking one."""
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
    ckpt = {"model.weight": torch.zeros(3, 2), "weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"1 given twice: weight \(from model.weight and from weight\)"):
        load_weights(model, ckpt, KeyMap([Rename("model.{rest*}", "{rest*}")]), where="f.safetensors")


# ------------------------------------------------ a composite checkpoint: LLaMA + CLIP tower + projector (LLaVA)


class _Composite(torch.nn.Module):
    """What LLaVA holds: a CLIP image tower, a two-layer projector and a LLaMA decoder."""

    def __init__(self, text, vision):
        super().__init__()
        from polymodal.models.clip import VisionTransformer
        from polymodal.models.llama import Llama

        self.vision_tower = VisionTransformer(vision)
        self.multi_modal_projector = torch.nn.ModuleDict({
            "linear_1": torch.nn.Linear(vision.hidden_size, text.hidden_size),
            "linear_2": torch.nn.Linear(text.hidden_size, text.hidden_size)})
        self.language_model = Llama(text)


def _composite_map(text, vision, layout: str) -> KeyMap:
    """Only the mounts: LLaMA's and CLIP's own maps do the rest."""
    from polymodal.models.clip import hf_vision_key_map
    from polymodal.models.llama import hf_key_map

    llama, tower = hf_key_map(text), hf_vision_key_map(vision)
    if layout == "4.x":  # the projector keeps its name; the tower under vision_model. (files transformers 5 writes
        return (llama.nested("language_model.", "language_model.")  # leave that out: accepted too)
                + tower.nested({"vision_tower.vision_model.": "", "vision_tower.": ""}, "vision_tower."))
    return (llama.nested({"model.language_model.": "model.", "lm_head.": "lm_head."}, "language_model.")
            + tower.nested({"model.vision_tower.": "", "model.vision_tower.vision_model.": ""}, "vision_tower.")
            + KeyMap([Rename("model.multi_modal_projector.{rest*}", "multi_modal_projector.{rest*}")]))


@pytest.fixture(scope="module")
def llava_reference(tmp_path_factory):
    """A tiny transformers LLaVA, every weight moved off its initial value, saved with save_pretrained."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from polymodal.models.clip import read_hf_vision_config
    from polymodal.models.llama import LlamaConfig as OurLlamaConfig
    from polymodal.models.llama import read_hf_config

    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    ref = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                    image_token_index=120))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in ref.parameters():
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
    d = tmp_path_factory.mktemp("llava") / "ref"
    ref.save_pretrained(d)
    ours = (read_hf_config(OurLlamaConfig, ref.config.text_config.to_dict()),
            read_hf_vision_config(ref.config.vision_config.to_dict()))
    return ref, d, ours


def _meta_composite(configs) -> torch.nn.Module:
    with torch.device("meta"):
        return _Composite(*configs)


def test_composite_loads_transformers_names_both_layouts(llava_reference):
    ref, d, configs = llava_reference
    want = {k: t.detach() for k, t in ref.state_dict().items()}  # transformers 5's names: the 5.x layout
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in want and "lm_head.weight" in want
    via5 = load_weights(_meta_composite(configs), want, _composite_map(*configs, "5.x"), where="5.x")
    via4 = load_weights(_meta_composite(configs), open_checkpoint(d), _composite_map(*configs, "4.x"), where=d)
    assert "language_model.model.norm.weight" in open_checkpoint(d).shapes  # save_pretrained writes 4.x names
    ours5, ours4 = via5.state_dict(), via4.state_dict()
    assert set(ours5) == set(ours4)
    for k, t in ours5.items():
        torch.testing.assert_close(ours4[k], t, atol=0, rtol=0, msg=k)
    # the tensors are transformers': the 5.x map, run backwards, gives back its state dict exactly
    back = _apply(_composite_map(*configs, "5.x").plan_save(ours5), ours5)
    assert set(back) == set(want)
    for k, t in want.items():
        torch.testing.assert_close(back[k], t, atol=0, rtol=0, msg=k)
    # 5.x names with the tower's `vision_model.` (transformers before the CLIPVisionModel flattening) load too
    spelled = {k.replace("model.vision_tower.", "model.vision_tower.vision_model."): t for k, t in want.items()}
    again = load_weights(_meta_composite(configs), spelled, _composite_map(*configs, "5.x"), where="5.x")
    torch.testing.assert_close(again.vision_tower.class_embedding, via5.vision_tower.class_embedding)
    # a missing tensor is named in the file's terms
    del want["model.language_model.layers.1.self_attn.o_proj.weight"]
    with pytest.raises(CheckpointError, match=r"language_model.layers.1.attn.proj.weight \(checkpoint: "
                                              r"model.language_model.layers.1.self_attn.o_proj.weight\)"):
        load_weights(_meta_composite(configs), want, _composite_map(*configs, "5.x"), where="5.x")


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_composite_saved_under_each_layout_is_what_transformers_loads(tmp_path, llava_reference, layout):
    from transformers import LlavaForConditionalGeneration

    ref, _, configs = llava_reference
    model = _Composite(*configs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in model.parameters():
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
    state = model.state_dict()
    tensors = {k: t.contiguous() for k, t in _apply(_composite_map(*configs, layout).plan_save(state), state).items()}
    prefixes = {"4.x": ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                        "multi_modal_projector."),
                "5.x": ("model.language_model.", "lm_head.", "model.vision_tower.", "model.multi_modal_projector.")}
    assert all(k.startswith(prefixes[layout]) for k in tensors) and len(tensors) == len(ref.state_dict())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref.config.save_pretrained(tmp_path)
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    got = back.state_dict()
    want = _apply(_composite_map(*configs, "5.x").plan_save(state), state)
    assert set(got) == set(want)
    for k, t in want.items():
        torch.testing.assert_close(got[k], t, atol=0, rtol=0, msg=k)
    # and our loader reads the file back
    again = load_weights(_meta_composite(configs), open_checkpoint(tmp_path), _composite_map(*configs, layout),
                         where=tmp_path)
    for k, t in again.state_dict().items():
        torch.testing.assert_close(t, state[k], atol=0, rtol=0, msg=k)


def test_incomplete_fuse_is_reported_not_guessed():
    km = KeyMap([Fuse(("a.q", "a.k", "a.v"), "a.qkv")])
    steps, _ = km.plan_load(["a.q", "a.k"])
    assert sorted(d for s in steps for d in s.dst) == ["a.k", "a.q"]


def test_load_save_round_trip_and_dtype(tmp_path):
    d = _tiny_vit_dir(tmp_path)
    m = pm.load(d)
    x = torch.randn(2, 3, 32, 32)
    assert not m.training
    m16 = pm.load(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    torch.testing.assert_close(m16(x.bfloat16()).float(), m(x), atol=0.1, rtol=0.05)  # bf16 has 8 mantissa bits
    pm.save(m, tmp_path / "again")
    torch.testing.assert_close(pm.load(tmp_path / "again")(x), m(x), atol=0, rtol=0)


def test_a_loaded_model_carries_one_record(tmp_path):
    d = _tiny_vit_dir(tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": False}))
    model = pm.load(d)
    rec = pm.record(model)
    assert rec == pm.ModelRecord(source=d, layout="transformers", generation_config={"eos_token_id": 2,
                                                                                     "do_sample": False})
    assert pm.record(model) is rec and rec.origin == d
    old = ("pm_source", "pm_layout", "pm_generation_config", "pm_gguf", "pm_tokenizer")
    assert [name for name in old if hasattr(model, name)] == []
    assert [name for name in vars(model) if "pm" in name] == ["_pm_record"]  # the record is all polymodal adds


def test_save_writes_the_layout_the_record_names(tmp_path):
    model = pm.build("vit", "vit-tiny-test")
    assert pm.record(model) == pm.ModelRecord()  # built in code: an empty record, made on first use
    x = torch.randn(1, 3, 32, 32)
    want = model.eval()(x)
    pm.save(model, tmp_path / "default")  # no layout chosen: the family's default
    assert json.loads((tmp_path / "default" / "config.json").read_text())["model_type"] == "vit"
    pm.record(model).layout = "polymodal"
    pm.save(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "polymodal-vit"
    loaded = pm.load(tmp_path / "ours")
    assert pm.record(loaded).layout == "polymodal"
    torch.testing.assert_close(loaded(x), want, atol=0, rtol=0)
    pm.record(loaded).layout = "timm"  # chosen on a loaded model: saved as timm's, read back as timm's
    pm.save(loaded, tmp_path / "timm")
    again = pm.load(tmp_path / "timm")
    assert pm.record(again).layout == "timm" and "architecture" in json.loads((tmp_path / "timm" / "config.json")
                                                                              .read_text())
    for name, t in model.state_dict().items():  # the same tensors (timm's config fixes LayerNorm's eps at 1e-6)
        torch.testing.assert_close(again.state_dict()[name], t, atol=0, rtol=0)
    pm.record(again).layout = "open_clip"
    with pytest.raises(ValueError, match=r"pm.record\(model\).layout is 'open_clip', which is not a layout of the "
                                         r"vit family; set it to one of \['polymodal', 'timm', 'transformers'\]"):
        pm.save(again, tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_sharded_checkpoint(tmp_path):
    model = pm.build("vit", "vit-tiny-test")
    pm.save(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(pm.load(tmp_path)(x), model.eval()(x), atol=0, rtol=0)
    (tmp_path / sorted(set(index["weight_map"].values()))[0]).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        pm.load(tmp_path)


def test_strict_loading_names_every_problem(tmp_path):
    d = _tiny_vit_dir(tmp_path)
    sd = load_file(d / "model.safetensors")
    sd.pop("encoder.layer.1.output.dense.bias")  # missing
    sd["encoder.layer.0.surprise.weight"] = torch.zeros(2)  # unexpected
    sd["layernorm.weight"] = torch.zeros(31)  # mis-shaped
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        pm.load(d)
    msg = str(e.value)
    assert str(d) in msg
    assert "blocks.1.mlp.fc2.bias (checkpoint: encoder.layer.1.output.dense.bias)" in msg and "1 missing" in msg
    assert "encoder.layer.0.surprise.weight" in msg and "1 unexpected" in msg
    assert "norm.weight: checkpoint [31] vs model [32]" in msg


def test_pickle_with_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = _tiny_vit_dir(tmp_path)
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.cls_token": Payload()}, f)
    with pytest.raises(CheckpointError, match="never runs code"):
        pm.load(d)
    assert not marker.exists()


def test_plain_pickled_state_dict_loads(tmp_path):
    d = _tiny_vit_dir(tmp_path)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    assert pm.load(d).cls_token.shape == (1, 1, 32)


def _write_raw_safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header, data, reason",
    [
        ({"t": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}, b"\0" * 16,
         "claims bytes"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "does not match"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
        ({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "invalid shape"),
    ],
)
def test_lying_safetensors_headers_are_refused(tmp_path, header, data, reason):
    p = tmp_path / "model.safetensors"
    _write_raw_safetensors(p, header, data)
    with pytest.raises(CheckpointError, match=reason):
        read_safetensors_header(p)
    with pytest.raises(CheckpointError, match=reason):
        open_checkpoint(p)


def test_huge_header_length_is_refused_without_reading(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(CheckpointError, match="claims"):
        read_safetensors_header(p)
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="not JSON"):
        read_safetensors_header(p)
    p.write_bytes(struct.pack("<Q", 5) + b"nope!")
    with pytest.raises(CheckpointError, match="starts with 'nope!', not '{'"):
        read_safetensors_header(p)


def test_unknown_family_and_missing_things(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'frobnicator'"):
        pm.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable JSON"):
        pm.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        pm.load(tmp_path / "does" / "not" / "exist")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hub could not provide it"):
        pm.load("polymodal-test/definitely-not-cached")
