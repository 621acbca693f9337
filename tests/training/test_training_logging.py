"""Run logging: W&B goes offline by itself without a key or network; loguru sinks rotate and compress."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from anime_role_detect.training import build_wandb_logger, wandb_offline_needed, wandb_reachable


def test_wandb_reachability_probe_uses_a_timeout():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        assert wandb_reachable("127.0.0.1", srv.getsockname()[1], timeout_s=1.0)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert not wandb_reachable("127.0.0.1", port, timeout_s=1.0)


def test_wandb_offline_without_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    offline, why = wandb_offline_needed()
    assert offline and "API key" in why


@pytest.mark.slow
def test_wandb_offline_run_directory_written(monkeypatch, tmp_path, synthetic_root, tiny, compose_cfg):
    from anime_role_detect.training import train

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be decided, not pre-set
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    out = tmp_path / "out"
    cfg = compose_cfg(
        tiny(tmp_path, synthetic_root)
        + ["logger=many", f"paths.output_dir={out}", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2"]
    )
    result = train(cfg)
    runs = list(out.glob("wandb/offline-run-*"))
    assert len(runs) == 1, list(out.rglob("*"))[:50]
    assert list(runs[0].glob("run-*.wandb")), list(runs[0].rglob("*"))
    media = [p.name for p in runs[0].rglob("*.png")]
    assert any(n.startswith("confusion_matrix") for n in media), media  # the confusion image was logged
    assert (out / "csv" / "metrics.csv").is_file()  # `many` = csv + wandb
    assert Path(result.ckpt_path).is_file()
    # Lightning's stdlib logging is routed into the loguru training sink
    training_log = (tmp_path / "logs" / "training.log").read_text()
    assert "GPU available" in training_log or "Trainer" in training_log


def test_build_wandb_logger_offline_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    lg = build_wandb_logger(project="t", save_dir=str(tmp_path))
    assert lg._offline is True


def test_loguru_sinks_rotate_and_compress(tmp_path):
    from anime_role_detect.log import setup_logging, system_log, training_log

    log_dir = setup_logging(
        {
            "dir": str(tmp_path / "logs"),
            "console_level": "ERROR",
            "compression": "zip",
            "sinks": {"training": {"rotation": "2 KB", "retention": "1 day"}, "system": {"rotation": "4 KB", "retention": "1 day"}},
        }
    )
    for i in range(200):
        training_log.info(f"epoch {i} loss {1.0 / (i + 1):.4f} " + "x" * 40)
    system_log.info("system line")
    zips = sorted(p.name for p in log_dir.glob("training.*.zip"))
    assert len(zips) >= 2, sorted(p.name for p in log_dir.iterdir())
    assert (log_dir / "training.log").stat().st_size < 4096
    assert "system line" in (log_dir / "system.log").read_text()
    assert "epoch 199" not in (log_dir / "inference.log").read_text()  # channels stay apart
    setup_logging({"dir": str(tmp_path / "logs2"), "console_level": "WARNING"})  # release the rotated files
