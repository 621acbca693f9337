"""The real `train.py` entry point: fast_dev_run, DDP on 2 CPU processes, multirun, one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _one_line_error(proc, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_fast_dev_run_end_to_end(tmp_path, synthetic_root, tiny, train_py):
    proc = train_py(tiny(tmp_path, synthetic_root) + ["+trainer.fast_dev_run=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LeafSpec" not in proc.stderr, proc.stderr[-3000:]  # torch's notice about Lightning's internals: no user's business
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    for name in ("metrics.json", "per_character.md", "confusion_matrix.png", "config.yaml"):
        assert (run / name).is_file(), name
    split = list((tmp_path / "data" / "splits").glob("*.json"))
    assert len(split) == 1  # the split manifest lives under paths.data_dir, not in the user's folder


def test_last_ckpt_holds_the_final_epoch_and_the_run_returns_the_best(tmp_path, synthetic_root, tiny, compose_cfg):
    """last.ckpt is what an interrupted run resumes from: the newest epoch, not a copy of the best one (Lightning's
    own save_last only copies a new best). The "best" here is the first epoch (monitor: epoch, min), so the two differ."""
    import torch

    from anime_role_detect.training import train

    out = tmp_path / "out"
    cfg = compose_cfg(tiny(tmp_path, synthetic_root, epochs=3) + [
        f"paths.output_dir={out}", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "evaluate=false",
        "callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=min"])
    result = train(cfg)
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(result.ckpt_path, map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 3)  # the end of the third epoch
    assert best["epoch"] == 0 and Path(result.ckpt_path).name.startswith("epoch_000"), result.ckpt_path
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [Path(result.ckpt_path).name, "last.ckpt"]


@pytest.mark.parametrize("budget, epochs", [([], 4), (["epoch_budget.max_steps=2"], 2),
                                            (["epoch_budget.max_steps=2", "epoch_budget.min_epochs=3"], 3)])
def test_epoch_budget_ends_the_schedule_where_its_steps_run_out(tmp_path, synthetic_root, tiny, compose_cfg, budget, epochs,
                                                              recwarn):
    """`epoch_budget`: trainer.max_epochs cut to the epochs that fit max_steps optimizer steps (one a epoch here), never
    below min_epochs; the run stops there and its cosine learning rate reaches its floor at that last epoch, not part-way.
    An epoch of one batch is shorter than the default logging interval (10): the run logs each epoch without
    Lightning's warning about it."""
    import torch

    from anime_role_detect.training import train

    out = tmp_path / "out"
    cfg = compose_cfg(tiny(tmp_path, synthetic_root, epochs=4) + [
        f"paths.output_dir={out}", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "evaluate=false", *budget])
    train(cfg)
    assert not [w for w in recwarn if "logging interval" in str(w.message)], [str(w.message) for w in recwarn]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (epochs - 1, epochs)
    sched = last["lr_schedulers"][0]
    assert sched["_last_lr"][0] / sched["base_lrs"][0] == pytest.approx(cfg.model.scheduler.min_lr_ratio)


def test_epoch_budget_counts_each_process_share_of_the_batches():
    """The steps an epoch takes per process (DDP splits the batches, ``limit_train_batches`` caps or scales them) decide
    how many epochs fit; a bad budget is a one-line ConfigError."""
    from anime_role_detect.errors import ConfigError
    from anime_role_detect.training.budget import apply_epoch_budget, batches_per_epoch, budgeted_epochs

    assert batches_per_epoch(182, 1.0) == 182 and batches_per_epoch(182, 1.0, world_size=2) == 91
    assert batches_per_epoch(182, 10) == 10 and batches_per_epoch(182, 0.5) == 91
    # the workflow's recipe: 8 epochs within 1,200 steps, never below 6
    assert [budgeted_epochs(8, spe, 1200, 6) for spe in (62, 150, 171, 182, 400)] == [8, 8, 7, 6, 6]
    assert budgeted_epochs(8, 182, None, 6) == 8
    with pytest.raises(ConfigError, match="epoch_budget: unknown key"):
        apply_epoch_budget(None, None, {"steps": 5})
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_epoch_budget(None, None, 1200)
    for bad in ({"max_steps": "many"}, {"max_steps": -5}, {"max_steps": 100, "min_epochs": 0}):
        with pytest.raises(ConfigError, match="must be positive whole numbers"):
            apply_epoch_budget(None, None, bad)


def test_logger_none_trains_with_default_callbacks(tmp_path, synthetic_root, tiny, train_py):
    # The default callbacks include an LR monitor, which Lightning refuses to run without a logger.
    args = tiny(tmp_path, synthetic_root) + [
        "logger=none",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "evaluate=false",
    ]
    proc = train_py(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1 and list(runs[0].rglob("*.ckpt")), runs


def test_ddp_two_cpu_processes_one_checkpoint(tmp_path, synthetic_root, tiny, train_py):
    """With the default progress bar: it syncs the epoch's metrics on rank 0 alone, and a collective of the model's
    own in `on_train_epoch_end` then hung both ranks at the end of the first epoch."""
    args = [a for a in tiny(tmp_path, synthetic_root) if "progress_bar" not in a] + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "~callbacks.last_checkpoint",
    ]
    proc = train_py(args, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # both ranks write into the same run folder
    ckpts = list(runs[0].rglob("*.ckpt"))
    assert len(ckpts) == 1, ckpts
    import torch

    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["run_config"]["trainer"]["strategy"] == "ddp"
    assert state["hyper_parameters"]["run_config"]["trainer"]["devices"] == 2
    assert (runs[0] / "metrics.json").is_file()
    # validation metrics are global (torchmetrics gathers every rank's pictures): Lightning is told so, not warned
    assert "sync_dist=True" not in proc.stderr, [ln for ln in proc.stderr.splitlines() if "sync_dist" in ln][:3]


def test_multirun_two_values_two_runs(tmp_path, synthetic_root, tiny, train_py):
    args = ["-m"] + tiny(tmp_path, synthetic_root) + ["+trainer.fast_dev_run=true", "model.optimizer.lr=1e-3,2e-3"]
    proc = train_py(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = []
    for j in jobs:
        assert (j / "checkpoints" / "last.ckpt").is_file() and (j / "metrics.json").is_file()
        lrs.append(float(next(ln for ln in (j / "config.yaml").read_text().splitlines() if ln.strip().startswith("lr:")).split(":")[1]))
    assert sorted(lrs) == [1e-3, 2e-3]


def test_missing_data_folder_one_line(tmp_path, tiny, train_py):
    proc = train_py(tiny(tmp_path, tmp_path / "no_such_folder"), cwd=tmp_path)
    _one_line_error(proc, "no_such_folder", "does not exist", "data.root=")


def _train_error(cfg) -> str:
    """Run the real `training.train` and return its `UserError` message (which must be one line)."""
    from anime_role_detect.errors import UserError
    from anime_role_detect.training import train

    with pytest.raises(UserError) as info:
        train(cfg)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 500, msg
    return msg


def test_empty_class_folder_one_line(tmp_path, synthetic_root, tiny, compose_cfg):
    root = tmp_path / "data_empty"
    shutil.copytree(synthetic_root, root)
    (root / "ghost").mkdir()
    msg = _train_error(compose_cfg(tiny(tmp_path, root) + [f"paths.output_dir={tmp_path / 'out'}"]))
    assert "ghost" in msg and "no images" in msg


def test_corrupt_image_one_line_when_not_skipping(tmp_path, synthetic_root, tiny, compose_cfg):
    root = tmp_path / "data_corrupt"
    shutil.copytree(synthetic_root, root)
    (root / "char_03" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    cfg = compose_cfg(tiny(tmp_path, root) + [f"paths.output_dir={tmp_path / 'out'}", "data.skip_unreadable=false"])
    msg = _train_error(cfg)
    assert "char_03/truncated.jpg" in msg and "skip_unreadable" in msg


def test_unknown_trainer_one_line(tmp_path, train_py):
    proc = train_py(["trainer=xyz"], cwd=tmp_path)
    line = _one_line_error(proc, "unknown trainer 'xyz'")
    for option in ("cpu", "gpu", "mps", "ddp", "default"):
        assert option in line


def test_null_config_group_one_line(tmp_path, train_py):
    # Hydra itself answers `experiment=null` with a ValueError traceback ("Config group override must be a string").
    proc = train_py(["experiment=null"], cwd=tmp_path)
    line = _one_line_error(proc, "experiment=null", "~experiment", "demo", "mixed5")
    assert "Config group override" not in line
