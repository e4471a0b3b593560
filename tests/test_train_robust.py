"""Training never loses or corrupts results: a finished run resumed is a no-op, no JSON file holds NaN, SIGINT and
SIGTERM save a checkpoint at a step boundary, damaged checkpoints and metrics are recovered from or refused in one
line, `--out` is checked before any data is loaded, and the figures a run prints agree with their definitions."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from test_train import _cli, _fake_fashion_mnist, _losses, _toy

from polymodal.cli import main
from polymodal.train import fit, recipe_config
from polymodal.train.checkpointing import CheckpointDir
from polymodal.train.recipes import RECIPES, ToyConfig


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity (Python's json accepts them; JSON does not)."""
    def refuse(token):
        raise AssertionError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def _train(out: Path, *args: str) -> int:
    return main(["train", "toy-regression", "--out", str(out), *args])


def _model_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state.pt", weights_only=True)["model"]


def _assert_same_model(a: Path, b: Path) -> None:
    sa, sb = _model_state(a), _model_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _never_built(monkeypatch, name: str = "toy-regression") -> None:
    """Make building the recipe's data and model fail the test: what runs before it must decide alone."""
    monkeypatch.setitem(RECIPES, name, replace(RECIPES[name], build=lambda c, w: pytest.fail("built the recipe")))


# ------------------------------------------------------------------------------------- finished runs


def test_resume_of_a_finished_run_reports_the_stored_results(tmp_path, capsys, monkeypatch):
    args = ("--set", "max_steps=4", "--set", "save_every=2")
    assert _train(tmp_path, *args) == 0
    capsys.readouterr()
    stored = (tmp_path / "results.json").read_text()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    _never_built(monkeypatch)
    assert _train(tmp_path, *args, "--resume", "--json") == 0
    out = capsys.readouterr()
    assert _strict_json(out.out) == _strict_json(stored)  # --json prints the stored figures
    assert "all 4 steps are done" in out.err
    # nothing was rewritten
    assert (tmp_path / "results.json").read_text() == stored and (tmp_path / "metrics.jsonl").read_text() == metrics
    results = _strict_json(stored)
    assert results["final_loss"] == _losses(tmp_path)[-1][1]
    # past max_steps: refused in one line, not silently reported as a shorter run
    assert _train(tmp_path, "--set", "max_steps=3", "--resume") == 2
    assert "is at step 4, past max_steps=3" in capsys.readouterr().err


def test_a_run_stopped_after_its_last_checkpoint_evaluates_on_resume(tmp_path):
    """Killed after the final checkpoint, before results.json: --resume trains nothing more and writes the
    results with the real last loss and training time (the checkpoint carries them)."""
    reference = tmp_path / "reference"
    assert _train(reference, "--set", "max_steps=4") == 0
    expected = _strict_json((reference / "results.json").read_text())
    shutil.copytree(reference, tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()
    assert _train(tmp_path / "run", "--set", "max_steps=4", "--resume") == 0
    results = _strict_json((tmp_path / "run" / "results.json").read_text())
    assert results["final_loss"] == expected["final_loss"] and results["smoothed_loss"] == expected["smoothed_loss"]
    assert results["eval"] == expected["eval"] and results["seconds"] == expected["seconds"]
    assert [s for s, _ in _losses(tmp_path / "run")] == [1, 2, 3, 4]


def test_json_files_hold_null_for_non_finite_numbers(tmp_path, capsys, monkeypatch):
    """A NaN loss at the last step (the update is skipped) and a NaN evaluation figure are written as null in
    metrics.jsonl, results.json and the --json output, never as the invalid token NaN."""
    def build(config, world):
        task, _ = _toy(max_steps=config.max_steps)
        inner = task.loss_fn

        def loss_fn(model, batch):
            loss, metrics = inner(model, batch)
            return (loss * float("nan") if task.data.offset == 3 * 16 else loss), metrics  # the third batch

        task.loss_fn = loss_fn
        task.evaluate = lambda m: {"train_mse": float("inf"), "ok": 1.0}
        return task

    monkeypatch.setitem(RECIPES, "toy-regression", replace(RECIPES["toy-regression"], build=build))
    assert _train(tmp_path, "--set", "max_steps=3", "--json") == 0
    printed = _strict_json(capsys.readouterr().out)
    results = _strict_json((tmp_path / "results.json").read_text())
    assert printed == results
    assert results["final_loss"] is None and results["skipped_steps"] == 1
    assert results["eval"] == {"train_mse": None, "ok": 1.0}
    records = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and records[-1]["loss"] is None and records[0]["loss"] > 0


# ------------------------------------------------------------------------------------------ signals


@pytest.fixture(scope="module")
def run_200(tmp_path_factory):
    """An uninterrupted 200-step run, with the default-like rare checkpoints (only the final one)."""
    out = tmp_path_factory.mktemp("run200")
    r = _cli(out, "--set", "max_steps=200", "--set", "save_every=1000")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("sig, status", [("sigint", 130), ("sigterm", 143)])
def test_a_signal_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, run_200, sig, status):
    args = ("--set", "max_steps=200", "--set", "save_every=1000")
    stopped = _cli(tmp_path, *args, env={"POLYMODAL_TRAIN_FAULT": f"{sig}:104"})  # sent at the start of step 104
    assert stopped.returncode == status, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    name = "SIGINT" if sig == "sigint" else "SIGTERM"
    assert last.startswith(f"interrupted ({name}) after step 104: saved ")
    assert str(tmp_path / "checkpoints" / "step-00000104") in last and last.endswith("--resume")
    assert "Traceback" not in stopped.stderr
    # the step under way was finished, then saved: a checkpoint at the step boundary, never mid-step
    assert [p.name for p in CheckpointDir(tmp_path / "checkpoints").complete()] == ["step-00000104"]
    assert [s for s, _ in _losses(tmp_path)] == list(range(1, 105))
    assert not (tmp_path / "results.json").exists()
    resumed = _cli(tmp_path, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path) == _losses(run_200)  # bitwise the uninterrupted run's curve
    _assert_same_model(tmp_path / "checkpoints" / "step-00000200", run_200 / "checkpoints" / "step-00000200")
    assert _strict_json((tmp_path / "results.json").read_text())["final_loss"] == \
        _strict_json((run_200 / "results.json").read_text())["final_loss"]


def test_under_torchrun_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    """Only rank 1 gets SIGINT; the processes agree on the step, save one whole checkpoint (both ranks' RNG
    states) and stop; --resume gives the uninterrupted 2-process run's losses."""
    args = ("--set", "max_steps=12", "--set", "save_every=100")
    ref = _cli(tmp_path / "ref", *args, torchrun=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    stopped = _cli(tmp_path / "run", *args, torchrun=2, env={"POLYMODAL_TRAIN_FAULT": "sigint:5@1"})
    assert stopped.returncode != 0
    assert "interrupted (SIGINT) after step 5" in stopped.stderr and "same torchrun command" in stopped.stderr
    complete = CheckpointDir(tmp_path / "run" / "checkpoints").complete()
    assert [p.name for p in complete] == ["step-00000005"]
    assert all((complete[0] / f"rng-rank{r}.pt").is_file() for r in (0, 1))
    resumed = _cli(tmp_path / "run", *args, "--resume", torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")


def test_a_torchrun_worker_leaves_through_end_process_with_its_exit_status(tmp_path, monkeypatch, capsys):
    """A process that joined a process group ends with os._exit after flushing (gloo's threads may still be
    releasing a finished collective's tensors, which aborts a worker in interpreter shutdown): the status is
    the one the command chose, from a return, a SystemExit, or SystemExit("message")."""
    import polymodal.cli as cli
    import polymodal.train.distributed as distributed

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise RuntimeError("os._exit")  # stands in for leaving: nothing after it may run

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    assert main(["train", "toy-regression", "--out", str(tmp_path / "a"), "--set", "lrr=1"]) == 2
    assert exits == []  # a plain process (no process group) returns as before
    monkeypatch.setattr(distributed, "_joined", True)
    for argv, status in ((["train", "toy-regression", "--out", str(tmp_path / "b"), "--set", "lrr=1"], 2),
                         (["train", "--no-such-flag"], 2)):
        with pytest.raises(RuntimeError, match="os._exit"):
            main(argv)
        assert exits[-1] == status
    monkeypatch.setattr(cli, "_main", lambda argv: (_ for _ in ()).throw(SystemExit("stopped: why")))
    with pytest.raises(RuntimeError, match="os._exit"):
        main([])
    assert exits[-1] == 1 and "stopped: why" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ warm-up


def test_warmup_is_derived_from_max_steps_unless_set():
    lenet = recipe_config("lenet-fashion-mnist")
    assert (lenet.warmup_steps, lenet.warmup) == (None, 200)  # the tuned schedule at the default length
    assert recipe_config("lenet-fashion-mnist", ["max_steps=200"]).warmup == 20  # 10% of a short run
    assert recipe_config("lenet-fashion-mnist", ["max_steps=200", "warmup_steps=150"]).warmup == 150  # as set
    assert recipe_config("lenet-fashion-mnist", ["warmup_steps=0"]).warmup == 0
    assert recipe_config("lenet-fashion-mnist", ["warmup_steps=50", "warmup_steps=auto"]).warmup == 200
    for name, steps in (("clip-shapes", 100), ("blip-shapes", 100), ("blip-shapes-vqa", 100),
                        ("vit-fashion-mnist", 300), ("toy-regression", 0)):
        assert recipe_config(name).warmup == steps, name  # every recipe's default schedule is unchanged


def test_a_short_run_is_not_all_warmup(tmp_path):
    """A recipe tuned with 100 warm-up steps, run for 40: the lr peaks at step 4 (10%) and then decays."""
    @dataclass(frozen=True)
    class LongWarmup(ToyConfig):
        default_warmup: ClassVar[int] = 100

    task, _ = _toy()
    config = LongWarmup(max_steps=40, log_every=1, save_every=40)
    fit(task, config, tmp_path)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs[3] == pytest.approx(config.lr) and max(lrs) == lrs[3]  # the peak, after 4 steps
    assert lrs[:4] == sorted(lrs[:4]) and lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.01 * config.lr
    assert "warm-up: 4 steps" in (tmp_path / "train.log").read_text()


# ---------------------------------------------------------------------------------- damaged state


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rewrite_state(checkpoint: Path, **changes) -> None:
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state.update(changes)
    torch.save(state, checkpoint / "state.pt")


def _drop_key(checkpoint: Path, key: str) -> None:
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    del state[key]
    torch.save(state, checkpoint / "state.pt")


def _poison(checkpoint: Path) -> None:
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state["model"]["fc2.weight"].fill_(float("nan"))
    torch.save(state, checkpoint / "state.pt")


def _cut_metrics(out: Path) -> None:  # a crash in the middle of writing the last line
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text[: len(text) - 25])


def _stepless_metrics(out: Path) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"loss": 1.0}\n[1, 2]\n')


CKPT = "checkpoints/step-00000006", "checkpoints/step-00000003"
# name -> (damage done to a run stopped at step 8 with checkpoints 3 and 6, what --resume must do)
DAMAGE = {
    "newest state.pt truncated": (lambda o: _truncate(o / CKPT[0] / "state.pt"), 3),
    "every state.pt truncated": (lambda o: [_truncate(o / c / "state.pt") for c in CKPT],
                                 "none of the 2 checkpoints in"),
    "newest state.pt missing": (lambda o: (o / CKPT[0] / "state.pt").unlink(), 3),
    "newest state.pt holds a negative step": (lambda o: _rewrite_state(o / CKPT[0], step=-6), 3),
    "every state.pt holds a negative step": (lambda o: [_rewrite_state(o / c, step=-1) for c in CKPT],
                                             "says step -1, but the checkpoint is step 6"),
    "newest state.pt lacks the optimizer": (lambda o: _drop_key(o / CKPT[0], "optimizer"), 3),
    "newest weights not finite": (lambda o: _poison(o / CKPT[0]), 3),
    "newest rng file truncated": (lambda o: _truncate(o / CKPT[0] / "rng-rank0.pt"), 3),
    "data position out of range": (lambda o: _rewrite_state(o / CKPT[0], data={"epoch": 0, "offset": -16}),
                                   "the saved data position (epoch 0, offset -16)"),
    "metrics.jsonl line cut mid-way": (_cut_metrics, 6),
    "metrics.jsonl line without a step": (_stepless_metrics, 6),
}


@pytest.fixture(scope="module")
def finished_12(tmp_path_factory):
    """An uninterrupted 12-step run (in this process), checkpoints every 3 steps, all kept."""
    out = tmp_path_factory.mktemp("finished12")
    assert _train(out, "--set", "max_steps=12", "--set", "save_every=3", "--set", "keep_last=10") == 0
    return out


def _stopped_at_8(reference: Path, where: Path) -> Path:
    """What a crash during step 8 of `reference` leaves: checkpoints 3 and 6, metrics up to step 7 (logged
    every step), no results."""
    shutil.copytree(reference, where)
    for name in ("step-00000009", "step-00000012"):
        shutil.rmtree(where / "checkpoints" / name)
    (where / "results.json").unlink()
    lines = (where / "metrics.jsonl").read_text().splitlines(keepends=True)
    (where / "metrics.jsonl").write_text("".join(lines[:7]))
    return where


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_state_is_recovered_from_or_refused_in_one_line(tmp_path, finished_12, capsys, name):
    damage, expect = DAMAGE[name]
    out = _stopped_at_8(finished_12, tmp_path / "run")
    damage(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    status = _train(out, "--set", "max_steps=12", "--set", "save_every=3", "--set", "keep_last=10", "--resume")
    err = capsys.readouterr().err
    if isinstance(expect, str):  # refused: one line, exit 2, and nothing of the run was changed
        assert status == 2, err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and expect in err, err
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        return
    assert status == 0, err
    log = (out / "train.log").read_text()
    assert f"resumed from {out / 'checkpoints' / f'step-{expect:08d}'} (step {expect})" in log
    if expect == 3:  # the damaged newest one was set aside, not deleted, and no longer counts
        assert (out / "checkpoints" / "step-00000006.rejected").is_dir() and "is set aside as" in log
    else:
        assert "dropped" in log and "unreadable line" in log
    # the run continued to exactly the uninterrupted run's losses and weights
    assert _losses(out) == _losses(finished_12)
    _assert_same_model(out / "checkpoints" / "step-00000012", finished_12 / "checkpoints" / "step-00000012")


# ----------------------------------------------------------------------------------- run directory


def test_out_is_checked_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    assert _train(tmp_path, "--set", "max_steps=2") == 0
    capsys.readouterr()
    _never_built(monkeypatch)
    assert _train(tmp_path, "--set", "max_steps=4") == 2  # a fresh run into a run directory
    err = capsys.readouterr().err
    assert "already holds checkpoints (newest: step-00000002)" in err and len(err.strip().splitlines()) == 1


def test_an_ablation_refuses_a_clash_before_training_any_variant(tmp_path, capsys, monkeypatch):
    (tmp_path / "abl" / "cls-2d" / "checkpoints" / "step-00000003").mkdir(parents=True)
    (tmp_path / "abl" / "cls-2d" / "checkpoints" / "step-00000003" / "COMPLETE").write_text("3\n")
    _never_built(monkeypatch, "vit-fashion-mnist")
    assert main(["train", "vit-fashion-mnist", "--out", str(tmp_path / "abl"), "--set", "ablation=true"]) == 2
    assert "cls-2d already holds checkpoints" in capsys.readouterr().err


# ------------------------------------------------------------------------------- what a run reports


def test_progress_bar_and_summary_report_the_same_defined_figures(tmp_path, monkeypatch, capsys):
    """The bar's `loss` is the last step's loss and `smoothed` its moving average (weight 0.1 on the newest);
    the summary, results.json and the CLI line report those same two figures."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    assert _train(tmp_path, "--set", "max_steps=30", "--set", "log_every=1") == 0
    printed = capsys.readouterr().out
    results = _strict_json((tmp_path / "results.json").read_text())
    losses = [loss for _, loss in _losses(tmp_path)]
    smoothed = losses[0]
    for loss in losses[1:]:
        smoothed = 0.9 * smoothed + 0.1 * loss
    assert results["final_loss"] == losses[-1]
    assert results["smoothed_loss"] == pytest.approx(smoothed, rel=1e-12)  # the same sum in the same order
    bar = screen.getvalue()  # tqdm orders the postfix by name; the last drawn figures are the final ones
    assert re.findall(r"\bloss=([\d.]+)", bar)[-1] == f"{losses[-1]:.4f}"
    assert re.findall(r"\bsmoothed=([\d.]+)", bar)[-1] == f"{smoothed:.4f}"
    assert f"final loss {losses[-1]:.4f} (the last step's; smoothed {smoothed:.4f}" in printed


def test_train_help_lists_the_recipes(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for name, recipe in RECIPES.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(recipe.description)}$", text, re.M), name


# ---------------------------------------------------------------------------------------- recipes


def test_lenet_recipe_exports_the_class_names(tmp_path):
    import polymodal as pm
    from polymodal.data.datasets import FASHION_MNIST_CLASSES

    data = _fake_fashion_mnist(tmp_path)
    assert main(["train", "lenet-fashion-mnist", "--out", str(tmp_path / "run"), "--set", f"data_root={data}",
                 "--set", "max_steps=2", "--set", "batch_size=32"]) == 0
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["id2label"] == list(FASHION_MNIST_CLASSES)
    model = pm.load(tmp_path / "run" / "model")
    assert model.config.id2label == FASHION_MNIST_CLASSES
    labels = pm.pipeline("image-classification", model=model).labels()
    assert labels == list(FASHION_MNIST_CLASSES)


def test_missing_fashion_mnist_names_the_data_root_setting(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["train", "lenet-fashion-mnist", "--out", str(tmp_path / "run"), "--set",
                 f"data_root={missing}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"not found in {missing} (the given folder" in err
    assert "--set data_root=DIR" in err and "pass root=" not in err
    assert not (tmp_path / "run").exists()
