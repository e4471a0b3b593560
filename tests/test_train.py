"""The training engine: config overrides, optimizer groups, schedule, accumulation, freezing, activation
checkpointing, bf16, NaN steps, atomic checkpoints with exact resume after SIGKILL, DDP on 2 CPU processes,
the CLI, and the clip-shapes, blip-shapes and lenet-fashion-mnist recipes at a tiny size."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from polymodal.cli import main
from polymodal.train import ConfigError, Task, apply_overrides, fit, param_groups, recipe_config, run
from polymodal.train.checkpointing import CheckpointDir
from polymodal.train.distributed import World
from polymodal.train.engine import WarmupCosine
from polymodal.train.recipes import ToyConfig, build_toy, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def _toy(**overrides) -> tuple[Task, ToyConfig]:
    config = apply_overrides(ToyConfig(), [f"{k}={v}" for k, v in overrides.items()])
    seed_everything(config.seed)
    return build_toy(config, World()), config


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _cli(out: Path, *extra: str, env: dict | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "polymodal.cli", "train", "toy-regression", "--out", str(out), *extra]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "polymodal.cli", *cmd[3:]]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=120, cwd=ROOT)


# ------------------------------------------------------------------------------------------- config


def test_overrides_are_typed_and_checked():
    c = apply_overrides(ToyConfig(), ["lr=0.5", "max_steps=7", "compile=false", "precision=bf16",
                                      "freeze=fc1,norm"])
    assert (c.lr, c.max_steps, c.compile, c.precision, c.freeze) == (0.5, 7, False, "bf16", ("fc1", "norm"))
    with pytest.raises(ConfigError, match="unknown setting 'lrr'"):
        apply_overrides(ToyConfig(), ["lrr=1"])
    with pytest.raises(ConfigError, match="max_steps must be an integer"):
        apply_overrides(ToyConfig(), ["max_steps=ten"])
    with pytest.raises(ConfigError, match="precision must be one of"):
        apply_overrides(ToyConfig(), ["precision=fp8"])
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        apply_overrides(ToyConfig(), ["batch_size=0"])
    # every recipe accepts the common settings
    for name in ("toy-regression", "clip-shapes", "blip-shapes", "blip-shapes-vqa", "lenet-fashion-mnist",
                 "vit-fashion-mnist"):
        c = recipe_config(name, ["max_steps=3", "batch_size=8", "lr=0.1", "seed=4", "log_every=2", "save_every=3"])
        assert (c.max_steps, c.batch_size, c.lr, c.seed, c.log_every, c.save_every) == (3, 8, 0.1, 4, 2, 3)


def test_param_groups_spare_norms_biases_and_positions():
    import polymodal as pm

    model = pm.build("clip", "clip-tiny-test")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay_names.isdisjoint(no_decay_names)
    assert len(decay_names) + len(no_decay_names) == len(names)
    assert "text.positional_embedding" in no_decay_names and "visual.positional_embedding" in no_decay_names
    assert "logit_scale" in no_decay_names and "text.token_embedding.weight" in decay_names
    assert all(n.endswith(".bias") or "ln" in n or "norm" in n or "embedding" in n or n == "logit_scale"
               for n in no_decay_names)
    assert all(model.get_parameter(n).ndim == 2 or "patch_embed" in n for n in decay_names)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_warmup_then_cosine():
    f = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == 1.0 and abs(f(9) - 0.55) < 1e-12 and abs(f(14) - 0.1) < 1e-12
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


# ------------------------------------------------------------------------------------------- engine


def test_loss_goes_down_and_metrics_are_logged(tmp_path):
    task, config = _toy(max_steps=30, log_every=5, save_every=100)
    summary = fit(task, config, tmp_path)
    losses = _losses(tmp_path)
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30]
    assert summary["eval"]["train_mse"] < 0.5 * losses[0][1]  # the loss went down
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "mae"} <= record.keys()
    assert [p.name for p in CheckpointDir(tmp_path / "checkpoints").complete()] == ["step-00000030"]


def test_tensorboard_gets_the_logged_metrics(tmp_path):
    """With TensorBoard installed (the test extras install it), OUT/tensorboard/ holds every logged scalar."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    task, config = _toy(max_steps=6, log_every=2, save_every=6)
    fit(task, config, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in logged] == [s for s, _ in _losses(tmp_path)] == [2, 4, 6]
    for (_, a), (_, b) in zip(logged, _losses(tmp_path)):
        assert a == pytest.approx(b, rel=1e-6)  # TensorBoard stores float32
    assert {"lr", "grad_norm"} <= set(events.Tags()["scalars"])


def test_progress_bar_shows_loss_rate_and_eta(tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):  # tqdm draws its bar only on a terminal
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    task, config = _toy(max_steps=6, log_every=2)
    fit(task, config, tmp_path)
    text = screen.getvalue()
    assert "6/6" in text and "loss=" in text and ("step/s" in text or "s/step" in text)
    assert "<" in text  # tqdm's "elapsed<remaining" ETA


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a_task, a_cfg = _toy(max_steps=5, grad_accum=1)
    b_task, b_cfg = _toy(max_steps=5, grad_accum=4)
    fit(a_task, a_cfg, tmp_path / "a")
    fit(b_task, b_cfg, tmp_path / "b")
    # same global batch, same math; only the summation order of the per-sample gradients differs (fp32 rounding)
    for (sa, la), (sb, lb) in zip(_losses(tmp_path / "a"), _losses(tmp_path / "b")):
        assert sa == sb and abs(la - lb) <= 1e-5 * max(1.0, abs(la))


def test_freeze_by_prefix(tmp_path):
    task, config = _toy(max_steps=3, freeze="fc1,norm")
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    fit(task, config, tmp_path)
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("fc1.", "norm.")))
    assert not torch.equal(before["fc2.weight"], after["fc2.weight"])
    task, config = _toy(max_steps=3, freeze="encoder")
    with pytest.raises(ConfigError, match="freeze: no parameter is named 'encoder'"):
        fit(task, config, tmp_path / "bad")


def test_activation_checkpointing_recomputes_and_keeps_gradients():
    from polymodal.train.engine import enable_activation_checkpointing

    calls = []

    class Counted(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    def grads(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        calls.clear()
        model = nn.Sequential(nn.Linear(4, 8), nn.ModuleList([Counted(8, 8), nn.Linear(8, 8)]))
        if checkpointing:
            enable_activation_checkpointing(model, ("1",))
        x = model[0](torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))
        for layer in model[1]:
            x = torch.tanh(layer(x))
        x.sum().backward()
        return [p.grad for p in model.parameters()], len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block ran again in backward
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    with pytest.raises(ConfigError, match="no submodule 'blocks'"):
        enable_activation_checkpointing(nn.Linear(2, 2), ("blocks",))


def test_bf16_autocast_trains_fp32_weights(tmp_path):
    task, config = _toy(max_steps=20, precision="bf16", log_every=20)
    fit(task, config, tmp_path)
    (step, loss), = _losses(tmp_path)
    assert step == 20 and loss == loss and loss < 1.0
    assert all(p.dtype == torch.float32 for p in task.model.parameters())


@pytest.mark.slow  # inductor compiles C++ on the CPU: ~30 s
def test_compile_gives_the_same_losses(tmp_path):
    plain_task, plain_cfg = _toy(max_steps=4)
    compiled_task, compiled_cfg = _toy(max_steps=4, compile="true")
    fit(plain_task, plain_cfg, tmp_path / "plain")
    fit(compiled_task, compiled_cfg, tmp_path / "compiled")
    assert "_orig_mod" not in "".join(compiled_task.model.state_dict())  # checkpoint keys are unchanged
    # inductor fuses and reorders fp32 arithmetic: equal up to rounding, not bitwise
    for (_, a), (_, b) in zip(_losses(tmp_path / "plain"), _losses(tmp_path / "compiled")):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))


def _nan_task(kind: str, at: int):
    task, config = _toy(max_steps=5, save_every=1, keep_last=10)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        pred = model(batch["x"])  # (B,)
        loss = torch.nn.functional.mse_loss(pred, batch["y"])
        if calls["n"] == at and kind == "loss":
            loss = loss * float("nan")
        if calls["n"] == at and kind == "grad":
            pred.register_hook(lambda g: g * float("nan"))  # a finite loss whose gradient is NaN
        return loss

    task.loss_fn = loss_fn
    return task, config


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nan_step_is_skipped_and_logged(tmp_path, kind):
    task, config = _nan_task(kind, at=3)
    summary = fit(task, config, tmp_path)
    assert summary["skipped_steps"] == 1
    log = (tmp_path / "train.log").read_text()
    assert f"step 3: {'loss' if kind == 'loss' else 'gradient norm'} is nan; the update was not applied" in log
    ckpts = CheckpointDir(tmp_path / "checkpoints").complete()
    assert [p.name[-1] for p in ckpts] == ["1", "2", "3", "4", "5"]
    states = [torch.load(p / "state.pt", weights_only=True)["model"] for p in ckpts]
    assert all(torch.isfinite(v).all() for s in states for v in s.values())
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])  # step 3 changed nothing
    assert not torch.equal(states[2]["fc2.weight"], states[3]["fc2.weight"])  # training went on


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    task, config = _toy(max_steps=4, save_every=1)
    count = {"n": 0}

    def poison(model):
        count["n"] += 1
        if count["n"] == 2:
            model.fc2.weight.fill_(float("inf"))

    task.after_step = poison
    with pytest.raises(RuntimeError, match="step 2: parameters are not finite; no checkpoint written"):
        fit(task, config, tmp_path)
    assert [p.name for p in CheckpointDir(tmp_path / "checkpoints").complete()] == ["step-00000001"]


# ---------------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 12-step run through the CLI, checkpoints every 3 steps, the newest 2 kept."""
    out = tmp_path_factory.mktemp("reference")
    r = _cli(out, "--set", "max_steps=12", "--set", "save_every=3", "--set", "keep_last=2")
    assert r.returncode == 0, r.stderr
    return out


def test_keep_last_k(reference_run):
    names = [p.name for p in (reference_run / "checkpoints").iterdir()]
    assert sorted(names) == ["step-00000009", "step-00000012"]
    assert len(_losses(reference_run)) == 12


def test_sigkill_twice_then_resume_gives_the_same_loss_curve(tmp_path, reference_run):
    args = ("--set", "max_steps=12", "--set", "save_every=3", "--set", "keep_last=2")
    checkpoints = CheckpointDir(tmp_path / "checkpoints")
    # 1. SIGKILL at a random step (seeded, so a failure reproduces); the newest checkpoint before it survives
    at = random.Random(4).randrange(2, 9)
    killed = _cli(tmp_path, *args, env={"POLYMODAL_TRAIN_FAULT": f"step:{at}"})
    assert killed.returncode == -signal.SIGKILL
    assert max((int(p.name[5:]) for p in checkpoints.complete()), default=0) == (at - 1) // 3 * 3
    # 2. resume, and SIGKILL again halfway through writing the step-9 checkpoint: the torn save never counts
    killed = _cli(tmp_path, *args, "--resume", env={"POLYMODAL_TRAIN_FAULT": "save:9"})
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoints.complete()][-1] == "step-00000006"
    assert (tmp_path / "checkpoints" / ".step-00000009.tmp" / "state.pt").is_file()
    # 3. resume to the end
    resumed = _cli(tmp_path, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # bitwise: same ops, same order, same data position and RNG state on the same CPU -> the very same floats
    assert _losses(tmp_path) == _losses(reference_run)
    assert not (tmp_path / "checkpoints" / ".step-00000009.tmp").exists()
    assert "resumed from" in (tmp_path / "train.log").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_and_grad_scaler_resume_exactly(tmp_path, precision):
    """On a GPU (the CLI trains there when one is present): bf16 autocast, and fp16 with its grad scaler, whose
    state is checkpointed too. A run SIGKILLed at step 5 and resumed gives the uninterrupted run's losses."""
    args = ("--set", "max_steps=10", "--set", "save_every=3", "--set", f"precision={precision}")
    full = _cli(tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    losses = _losses(tmp_path / "full")
    assert losses[-1][1] < losses[0][1]
    killed = _cli(tmp_path / "resumed", *args, env={"POLYMODAL_TRAIN_FAULT": "step:5"})
    assert killed.returncode == -signal.SIGKILL
    resumed = _cli(tmp_path / "resumed", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "resumed") == losses
    newest = sorted((tmp_path / "full" / "checkpoints").glob("step-*"))[-1]
    scaler = torch.load(newest / "state.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (precision == "fp16")  # fp16's loss scale travels with the checkpoint


# -------------------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, reference_run, strategy):
    args = ("--set", "max_steps=12", "--set", "save_every=6", "--set", f"strategy={strategy}")
    r = _cli(tmp_path, *args, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _losses(reference_run), _losses(tmp_path)
    assert [s for s, _ in one] == [s for s, _ in two]
    # the same samples and math; two half-batch gradients averaged by all-reduce round differently from one
    # full-batch mean (fp32, ~1e-7 relative per step), compounded over 12 Adam steps: 1e-5 relative is tight
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, two)


def test_torchrun_killed_at_a_random_step_resumes_to_the_same_loss_curve(tmp_path):
    """2 processes under torchrun, both SIGKILLed at a random step, then `--resume` under torchrun again: the
    loss curve is exactly that of an uninterrupted 2-process run (the data position and every rank's RNG come
    back; gloo's all-reduce sums in a fixed order)."""
    args = ("--set", "max_steps=12", "--set", "save_every=3")
    ref = _cli(tmp_path / "ref", *args, torchrun=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    at = random.Random(7).randrange(4, 12)
    killed = _cli(tmp_path / "run", *args, torchrun=2, env={"POLYMODAL_TRAIN_FAULT": f"step:{at}"})
    assert killed.returncode != 0
    complete = CheckpointDir(tmp_path / "run" / "checkpoints").complete()
    assert max(int(p.name[5:]) for p in complete) == (at - 1) // 3 * 3
    for rank in (0, 1):  # every process's generators were saved
        assert (complete[-1] / f"rng-rank{rank}.pt").is_file()
    resumed = _cli(tmp_path / "run", *args, "--resume", torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")


# --------------------------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["train", "no-such-recipe", "--out", str(tmp_path)]) == 2
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err
    assert main(["train", "toy-regression", "--out", str(tmp_path), "--set", "speed=11"]) == 2
    assert "unknown setting 'speed'" in capsys.readouterr().err
    assert main(["train", "toy-regression", "--out", str(tmp_path), "--set", "lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "lr must be a number; got 'fast'" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "toy-regression", "--out", str(tmp_path), "--set", "max_steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", "toy-regression", "--out", str(tmp_path), "--set", "max_steps=2"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # --resume with a larger max_steps continues the same run
    assert main(["train", "toy-regression", "--out", str(tmp_path), "--set", "max_steps=4", "--resume"]) == 0
    assert [s for s, _ in _losses(tmp_path)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------- recipes


def test_clip_shapes_recipe_tiny(tmp_path):
    import polymodal as pm

    summary = run("clip-shapes", tmp_path, ["max_steps=8", "batch_size=32", "train_images=128", "eval_images=8",
                                            "warmup_steps=1", "log_every=1", "save_every=4"])
    losses = [loss for _, loss in _losses(tmp_path)]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]
    ev = summary["eval"]
    for key in ("zero_shot_seen", "zero_shot_heldout", "image_to_text_R@1", "text_to_image_R@5"):
        assert 0.0 <= ev[key] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["eval"] == ev
    model = pm.load(tmp_path / "model")
    assert model.logit_scale.item() <= 4.6052 + 1e-6


def test_blip_recipes_tiny(tmp_path):
    """blip-shapes: the three BLIP objectives train together; the evaluation reports every metric; the exported
    captioning and retrieval checkpoints load into transformers' BLIP classes and into the pipelines.
    blip-shapes-vqa: starts from those parts, trains, and its model answers through the VQA pipeline."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    import polymodal as pm

    summary = run("blip-shapes", tmp_path, ["max_steps=6", "batch_size=16", "train_images=64", "eval_images=6",
                                            "image_size=32", "warmup_steps=1", "log_every=1", "save_every=6"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all({"itc", "itm", "lm"} <= set(r) for r in records)
    assert min(r["lm"] for r in records[-2:]) < records[0]["lm"]
    ev = summary["eval"]
    for key in ("caption_exact_train", "caption_exact_heldout", "itm_accuracy_train", "itm_accuracy_heldout",
                "itc_recall@1_train", "capfilt_noisy_removed", "capfilt_clean_kept"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert len(ev["caption_examples_train"]) == 5
    BlipForConditionalGeneration.from_pretrained(tmp_path / "model" / "captioning")
    BlipForImageTextRetrieval.from_pretrained(tmp_path / "model" / "retrieval")
    from polymodal.data import ShapesWorld

    image = ShapesWorld(32, seed=5, vocab="full").sample(0).image
    caption = pm.pipeline("image-to-text", model=tmp_path / "model" / "captioning")(image, max_new_tokens=4)
    assert isinstance(caption[0]["generated_text"], str)
    ranked = pm.pipeline("image-text-matching", model=tmp_path / "model" / "retrieval")(image, ["a red circle"])
    assert 0.0 <= ranked[0]["score"] <= 1.0

    # VQA fine-tuning starts from this run's parts, as BLIP's does
    from dataclasses import replace

    from polymodal.train.recipes import _init_vqa_from, shapes_blip_config

    vqa = pm.build("blip", replace(shapes_blip_config(32), task="vqa"))
    _init_vqa_from(vqa, str(tmp_path))
    retrieval = pm.load(tmp_path / "model" / "retrieval")
    torch.testing.assert_close(vqa.text_encoder.layers[0].attn.qkv.weight,
                               retrieval.text_encoder.layers[0].attn.qkv.weight, atol=0, rtol=0)
    summary = run("blip-shapes-vqa", tmp_path / "vqa", ["max_steps=4", "batch_size=16", "train_images=32",
                                                        "eval_images=3", "image_size=32", "log_every=1",
                                                        f"init={tmp_path}"])
    losses = [loss for _, loss in _losses(tmp_path / "vqa")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert set(summary["eval"]["vqa_by_kind_train"]) == {"how many", "is there", "what color", "what shape"}
    answer = pm.pipeline("visual-question-answering", model=tmp_path / "vqa" / "model")(image, "what color is it?")
    assert isinstance(answer[0]["answer"], str)
    with pytest.raises(ConfigError, match="finished blip-shapes run"):
        _init_vqa_from(vqa, str(tmp_path / "vqa"))


def _fake_fashion_mnist(tmp_path) -> Path:
    """Small IDX files in Fashion-MNIST's layout (the training images gzipped, the test ones plain), 64 training
    and 20 test images with a class-specific bright band: learnable in a few steps, no dataset package needed."""
    import gzip
    import struct

    import numpy as np

    def idx(array: np.ndarray) -> bytes:  # two zero bytes, type 0x08 (unsigned byte), ndim, each dim as int32
        return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
            array.astype(np.uint8).tobytes()

    rng = np.random.default_rng(0)
    labels = np.arange(64) % 10
    images = rng.integers(0, 60, (64, 28, 28))
    for k in range(10):
        images[labels == k, 2 * k + 4: 2 * k + 8, :] = 250
    data = tmp_path / "fmnist"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images)))
    (data / "train-labels-idx1-ubyte").write_bytes(idx(labels))
    (data / "t10k-images-idx3-ubyte").write_bytes(idx(images[:20]))
    (data / "t10k-labels-idx1-ubyte").write_bytes(idx(labels[:20]))
    return data


def test_lenet_fashion_mnist_recipe_tiny(tmp_path):
    """A few steps on generated IDX files (no dataset package needed): the MAP loss goes down and the test
    accuracy is reported."""
    data = _fake_fashion_mnist(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "lenet-fashion-mnist", "--out", str(out), "--set", f"data_root={data}",
                 "--set", "max_steps=30", "--set", "batch_size=32", "--set", "warmup_steps=2",
                 "--set", "log_every=1", "--set", "save_every=30"]) == 0
    losses = [loss for _, loss in _losses(out)]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    ev = json.loads((out / "results.json").read_text())["eval"]
    assert 0.0 <= ev["test_accuracy"] <= 1.0 and ev["test_images"] == 20


_TINY_VIT = ["hidden_size=16", "layers=1", "heads=2", "mlp_size=32", "batch_size=32", "warmup_steps=2", "lr=0.005",
             "augment=false", "log_every=1"]  # augmentation would shift the fake images' class bands


def test_vit_fashion_mnist_recipe_tiny(tmp_path):
    """A tiny ViT on generated IDX files: the loss goes down, the test accuracy is reported, and the exported
    checkpoint loads back as a ViT classifier over the ten Fashion-MNIST labels."""
    import polymodal as pm

    data = _fake_fashion_mnist(tmp_path)
    out = tmp_path / "run"
    summary = run("vit-fashion-mnist", out, [f"data_root={data}", "max_steps=40", "save_every=40", *_TINY_VIT])
    losses = [loss for _, loss in _losses(out)]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert 0.0 <= summary["eval"]["test_accuracy"] <= 1.0 and summary["eval"]["test_images"] == 20
    model = pm.load(out / "model")
    assert model.config.num_labels == 10 and model.config.id2label[0] == "T-shirt/top"
    assert model.classify(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_vit_fashion_mnist_ablation_tiny(tmp_path, capsys):
    """ablation=true trains each of the paper's variants and prints one table row per variant; --resume skips
    the variants already done."""
    from polymodal.models.vit import ViT
    from polymodal.train.recipes import VIT_VARIANTS

    data = _fake_fashion_mnist(tmp_path)
    out = tmp_path / "abl"
    args = ["train", "vit-fashion-mnist", "--out", str(out), "--set", "ablation=true", "--set", f"data_root={data}",
            "--set", "max_steps=3", "--set", "save_every=3"]
    for o in _TINY_VIT:
        args += ["--set", o]
    assert main(args) == 0
    table = capsys.readouterr().out
    for v in VIT_VARIANTS:
        assert f"| `{v}` |" in table
        assert (out / v / "model" / "config.json").is_file()
    assert (out / "ablation.md").read_text().strip() in table
    results = json.loads((out / "ablation.json").read_text())
    assert set(results) == set(VIT_VARIANTS) and all(0 <= r["test_accuracy"] <= 1 for r in results.values())
    import polymodal as pm

    hybrid, gap = pm.load(out / "hybrid" / "model"), pm.load(out / "gap-1d" / "model")
    assert isinstance(hybrid, ViT) and hybrid.backbone is not None and gap.cls_token is None
    assert pm.load(out / "cls-none" / "model").config.position == "none"
    mtime = (out / "cls-1d" / "variant.json").stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0  # every variant is complete: nothing is trained again
    assert (out / "cls-1d" / "variant.json").stat().st_mtime_ns == mtime
