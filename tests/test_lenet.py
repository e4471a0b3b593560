"""LeNet-5: shapes, the paper's C3 connection table and parameter count, the RBF output, gradients,
training on a separable toy problem, and the save/load round trip. No reference library holds LeNet-5, so
these tests check the paper's statements directly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import polymodal as pm
from polymodal.models.lenet import C3_TABLE, DIGITS, PRESETS, LeNet, LeNetConfig, digit_centers, squash


def _model(name: str = "lenet-5", seed: int = 0) -> LeNet:
    torch.manual_seed(seed)
    return LeNet(PRESETS[name]).eval()


def _x(cfg: LeNetConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shapes(name):
    m = _model(name)
    cfg = m.config
    out = m(_x(cfg, batch=5))
    assert out.shape == (5, cfg.num_classes)
    assert torch.isfinite(out).all()
    assert torch.equal(m.classify(_x(cfg, batch=5)), out)


def test_layer_shapes_follow_the_paper():
    m, x = _model(), _x(LeNetConfig(), batch=2)
    x = squash(m.c1(x))
    assert x.shape == (2, 6, 28, 28)
    x = squash(m.s2(x))
    assert x.shape == (2, 6, 14, 14)
    x = squash(m.c3(x))
    assert x.shape == (2, 16, 10, 10)
    x = squash(m.s4(x))
    assert x.shape == (2, 16, 5, 5)
    assert squash(m.c5(x)).shape == (2, 120, 1, 1)


def test_trainable_parameters_are_the_papers_60000():
    m = _model()
    stored = sum(p.numel() for p in m.parameters())
    unconnected = int((m.c3.mask == 0).sum()) * 25  # C3 weights the table leaves out never act
    assert stored - unconnected == 60_000
    # C3 alone: 1,516 trainable parameters (section II.B)
    assert int(m.c3.mask.sum()) * 25 + 16 == 1516


def test_c3_table_matches_table_1():
    assert len(C3_TABLE) == 16
    assert [len(t) for t in C3_TABLE] == [3] * 6 + [4] * 9 + [6]
    # Table I read by rows (S2 map j -> the C3 maps that see it)
    rows = {
        0: {0, 4, 5, 6, 9, 10, 11, 12, 14, 15},
        1: {0, 1, 5, 6, 7, 10, 11, 12, 13, 15},
        2: {0, 1, 2, 6, 7, 8, 11, 13, 14, 15},
        3: {1, 2, 3, 6, 7, 8, 9, 12, 14, 15},
        4: {2, 3, 4, 7, 8, 9, 10, 12, 13, 15},
        5: {3, 4, 5, 8, 9, 10, 11, 13, 14, 15},
    }
    for j, maps in rows.items():
        assert {k for k, t in enumerate(C3_TABLE) if j in t} == maps


def test_c3_map_sees_only_its_inputs():
    m = _model()
    s2 = torch.randn(2, 6, 14, 14)
    base = m.c3(s2)
    for j in range(6):
        changed = s2.clone()
        changed[:, j] = torch.randn(2, 14, 14)  # replace S2 map j
        out = m.c3(changed)
        for k, inputs in enumerate(C3_TABLE):
            differs = not torch.equal(out[:, k], base[:, k])
            assert differs == (j in inputs), f"C3 map {k} vs S2 map {j}"


def test_full_connection_sees_everything():
    m = _model("lenet-5-linear")
    s2 = torch.randn(1, 6, 14, 14)
    zeroed = s2.clone()
    zeroed[:, 3] = 0
    assert not torch.isclose(m.c3(s2), m.c3(zeroed)).all(dim=(0, 2, 3)).any()  # every map changes


def test_rbf_output_is_minus_squared_distance_to_fixed_bitmaps():
    assert all(len(d) == 84 and set(d) <= {"#", "."} for d in DIGITS)
    centers = digit_centers()
    assert centers.shape == (10, 84) and set(centers.unique().tolist()) == {-1.0, 1.0}
    assert len({tuple(c.tolist()) for c in centers}) == 10  # ten distinct codes
    m = _model()
    x = _x(m.config)
    f6 = squash(m.f6(squash(m.c5(squash(m.s4(squash(m.c3(squash(m.s2(squash(m.c1(x)))))))))).flatten(1)))
    expected = -((f6[:, None, :] - centers[None]) ** 2).sum(-1)
    torch.testing.assert_close(m(x), expected)
    assert torch.equal(m.output.centers, centers)
    assert not any("centers" in k for k in m.state_dict())  # fixed, never stored
    assert squash(torch.tensor(1.0)).item() == pytest.approx(1.0, abs=1e-4)  # f(1) = 1 (Appendix A)


def test_backward():
    m = _model().train()
    loss = F.cross_entropy(m(_x(m.config, batch=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # unconnected C3 weights get no gradient
    assert (m.c3.weight.grad * (1 - m.c3.mask)).abs().max() == 0


@pytest.mark.parametrize("name", ["lenet-tiny-test", "lenet-5", "lenet-5-linear"])
def test_adam_reduces_loss_on_separable_problem(name):
    torch.manual_seed(0)
    cfg = PRESETS[name]
    m = LeNet(cfg).train()
    g = torch.Generator().manual_seed(1)
    prototypes = torch.randn(cfg.num_classes, 1, cfg.image_size, cfg.image_size, generator=g)
    y = torch.arange(64) % cfg.num_classes
    x = prototypes[y] + 0.3 * torch.randn(64, 1, cfg.image_size, cfg.image_size, generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert (m(x).argmax(1) == y).float().mean() > 0.7


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_save_load_round_trip(tmp_path, name):
    m = _model(name)
    x = _x(m.config)
    pm.save(m, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "polymodal-lenet"
    assert raw["connection"] == m.config.connection and raw["output"] == m.config.output
    back = pm.load(tmp_path)
    assert isinstance(back, LeNet) and not back.training
    assert back.config == m.config
    state, loaded = m.state_dict(), back.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    # the weights are bitwise equal; the outputs may differ in the last bit, as a loaded tensor can sit at
    # another memory alignment and take another SIMD path
    torch.testing.assert_close(back(x), m(x), rtol=1e-6, atol=0)
    if m.config.connection == "table":
        assert torch.equal(back.c3.mask, m.c3.mask)  # rebuilt after loading on the meta device


def test_class_names_travel_with_the_checkpoint(tmp_path):
    """`id2label` (what the Fashion-MNIST recipe sets) is saved and read back, and must name every class."""
    names = tuple(f"class {i}" for i in range(10))
    torch.manual_seed(0)
    pm.save(LeNet(LeNetConfig(id2label=names)), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["id2label"] == list(names)
    assert pm.load(tmp_path).config.id2label == names
    with pytest.raises(ValueError, match="id2label names 3 classes, but num_classes is 10"):
        LeNetConfig(id2label=("a", "b", "c"))


def test_strict_loading_names_missing_tensor(tmp_path):
    pm.save(_model(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["c3.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(pm.CheckpointError, match=r"missing.*c3\.weight"):
        pm.load(tmp_path)


def test_bad_inputs_are_named():
    m = _model()
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\).*\(2, 1, 28, 28\)"):
        m(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="image_size"):
        LeNetConfig(image_size=30)
    with pytest.raises(ValueError, match="num_classes=26"):
        LeNetConfig(num_classes=26)
    with pytest.raises(ValueError, match="connection"):
        LeNetConfig(connection="sparse")
