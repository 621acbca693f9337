"""The Hydra config tree: every group option composes, objects instantiate, sweeps are wired."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from anime_role_detect.errors import ConfigError
from anime_role_detect.confutil import CONFIG_DIR, check_group_overrides


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "mps", "ddp"])
def test_trainer_options_compose(compose_cfg, trainer):
    cfg = compose_cfg([f"trainer={trainer}"])
    assert cfg.trainer._target_.endswith("Trainer")
    expected = {"default": "auto", "cpu": "cpu", "gpu": "gpu", "mps": "mps", "ddp": "auto"}[trainer]
    assert cfg.trainer.accelerator == expected
    if trainer == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.num_nodes == 1


def test_cpu_ddp_trainer_instantiates_with_gloo(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer=ddp", "trainer.accelerator=cpu", f"paths.output_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.strategy._get_process_group_backend() == "gloo"
    assert trainer.num_devices == 2


def test_default_run_is_the_offline_demo(compose_cfg):
    cfg = compose_cfg([])
    assert cfg.model.backbone.name == "efficientnet_lite0_offline" and cfg.model.backbone.pretrained
    assert cfg.data.synthetic.root == cfg.data.root  # generated on first use
    assert cfg.model.optimizer.weight_decay == pytest.approx(1e-4) and cfg.data.batch_size == 16
    b0 = compose_cfg(["model=efficientnet_b0"])
    assert b0.model.backbone.name == "efficientnet_b0" and b0.model.optimizer.lr == pytest.approx(5e-5)
    assert b0.callbacks.model_checkpoint.monitor == "val/acc" and b0.callbacks.early_stopping.monitor == "val/acc"


@pytest.mark.parametrize("experiment", ["newgame_full", "mixed5"])
def test_real_data_experiments_point_at_shared_data(compose_cfg, experiment, project_root):
    cfg = compose_cfg([f"experiment={experiment}", f"paths.root_dir={project_root}"])
    assert Path(cfg.data.root).resolve() == (project_root.parent / "shared" / "data" / experiment).resolve()
    assert cfg.data.synthetic is None and cfg.model.backbone.name == "efficientnet_lite0_offline"


def test_optuna_search_is_wired(compose_cfg):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert "model.optimizer.lr" in sweeper.params and cfg.optimized_metric == "val/acc"


def test_loggers_and_callbacks_instantiate(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(["logger=many", f"paths.output_dir={tmp_path}"])
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert {type(lg).__name__ for lg in loggers} == {"CSVLogger", "WandbLogger"}
    callbacks = {type(instantiate(c)).__name__ for c in cfg.callbacks.values()}
    assert callbacks == {"ModelCheckpoint", "EarlyStopping", "LearningRateMonitor", "TQDMProgressBar", "ChannelsLast"}
    assert "channels_last" not in compose_cfg(["~callbacks.channels_last"]).callbacks  # how a user turns it off


def test_channels_last_moves_the_weights_not_their_values():
    """`ChannelsLast` lays a network's 4-D weights out channels-last before a fit; its outputs stay the same."""
    import torch

    from anime_role_detect.training.formats import ChannelsLast, native_bf16

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    before = net(x)
    ChannelsLast().setup(None, net, "fit")
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in net.parameters() if p.ndim == 4)
    assert torch.allclose(net(x), before, atol=1e-5)
    assert isinstance(native_bf16(), bool)


def test_group_override_check():
    check_group_overrides(["trainer=cpu", "model=tiny", "data.root=/x", "-m", "model.optimizer.lr=1e-3,1e-4"])
    check_group_overrides(["trainer=cpu,ddp", "hparams_search=optuna", "~experiment"])
    with pytest.raises(ConfigError, match=r"experiment=null cannot unset a config group; drop it with ~experiment .*demo, mixed5"):
        check_group_overrides(["experiment=null"])
    with pytest.raises(ConfigError, match=r"unknown trainer 'tpu'; choose one of: cpu, ddp, default, gpu, mps"):
        check_group_overrides(["trainer=tpu"])
    with pytest.raises(ConfigError, match="unknown model 'vit_huge'"):
        check_group_overrides(["model=vit_huge"])


def _site(tmp_path: Path) -> Path:
    """A site's config folder: one shipped file changed (trainer/cpu.yaml) and one option added (experiment/site)."""
    site = tmp_path / "site"
    (site / "trainer").mkdir(parents=True)
    (site / "experiment").mkdir()
    (site / "trainer" / "cpu.yaml").write_text((CONFIG_DIR / "trainer" / "cpu.yaml").read_text() + "max_epochs: 7\n")
    (site / "experiment" / "site.yaml").write_text("# @package _global_\ntags: [site]\n")
    return site


def test_ard_conf_dir_layers_a_site_folder_over_the_shipped_configs(tmp_path, monkeypatch):
    from anime_role_detect.confutil import compose_config

    assert compose_config("train", ["trainer=cpu", "~experiment"]).trainer.max_epochs != 7
    monkeypatch.setenv("ARD_CONF_DIR", str(_site(tmp_path)))
    cfg = compose_config("train", ["trainer=cpu", "experiment=site"])
    assert cfg.trainer.max_epochs == 7 and list(cfg.tags) == ["site"]  # the site's file wins, its new option is found
    assert cfg.trainer.accelerator == "cpu" and cfg.model.backbone.name  # everything else still comes from the package
    check_group_overrides(["experiment=site"])  # the command-line check sees the site's options too
    with pytest.raises(ConfigError, match="unknown experiment 'nope'; choose one of: demo, mixed5, newgame_full, site"):
        check_group_overrides(["experiment=nope"])


def test_ard_conf_dir_reaches_the_entry_points(tmp_path, project_root):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ARD_CONF_DIR": str(_site(tmp_path))}
    proc = subprocess.run([sys.executable, str(project_root / "train.py"), "--cfg", "job", "trainer=cpu", "experiment=site"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max_epochs: 7" in proc.stdout and "- site" in proc.stdout
    env["ARD_CONF_DIR"] = str(tmp_path / "missing")
    proc = subprocess.run([sys.executable, str(project_root / "train.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ARD_CONF_DIR=") and "Traceback" not in proc.stderr

