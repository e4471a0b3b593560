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
