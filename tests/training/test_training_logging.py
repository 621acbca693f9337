"""Run logging: W&B goes offline by itself without a key or network; loguru sinks rotate and compress; learning curves."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from anime_role_detect.training.wandb_logger import build_wandb_logger, wandb_offline_needed, wandb_reachable
from anime_role_detect.training.evaluation import plot_learning_curves, read_epoch_metrics

# Lightning CSVLogger layout: every row fills only what was logged at that step (LR monitor rows carry no epoch).
SPARSE_METRICS_CSV = """epoch,lr-AdamW,step,train/acc,train/loss,val/acc,val/f1_macro,val/loss
,0.001,0,,,,,
0,,3,,,0.25,0.2,1.9
0,,3,0.3,2.1,,,
,0.0009,4,,,,,
1,,7,,,0.5,0.45,1.4
1,,7,0.6,1.5,,,
"""


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
    assert any(n.startswith("learning_curves") for n in media), media  # and so were the learning curves
    assert (out / "learning_curves.png").is_file()
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


def test_learning_curves_from_sparse_metrics_csv(tmp_path):
    from PIL import Image

    metrics_csv = tmp_path / "metrics.csv"
    metrics_csv.write_text(SPARSE_METRICS_CSV)
    epochs = read_epoch_metrics(metrics_csv)
    assert list(epochs) == [0, 1]
    assert epochs[1] == {"train/acc": 0.6, "train/loss": 1.5, "val/acc": 0.5, "val/f1_macro": 0.45, "val/loss": 1.4}
    png = plot_learning_curves(metrics_csv, tmp_path / "report" / "learning_curves.png")
    assert png == tmp_path / "report" / "learning_curves.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 200, (img.format, img.size)


def test_learning_curves_skipped_without_epoch_rows(tmp_path):
    assert plot_learning_curves(tmp_path / "missing.csv", tmp_path / "a.png") is None
    lr_only = tmp_path / "metrics.csv"
    lr_only.write_text("epoch,lr-AdamW,step\n,0.001,0\n")
    assert plot_learning_curves(lr_only, tmp_path / "b.png") is None
    assert not list(tmp_path.glob("*.png"))


def test_library_start_up_chatter_reaches_the_log_files_not_the_console(tmp_path):
    """faiss's loader (an INFO line per SIMD build it could not load, with a ModuleNotFoundError in it) and
    Lightning's add-on tip stay off a user's console and in system.log; a library's warning still reaches both."""
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from anime_role_detect.log import setup_logging\n"
        f"setup_logging({{'dir': {str(tmp_path / 'logs')!r}, 'enqueue': False}})\n"
        "import faiss\n"  # its loader logs through stdlib logging at import
        "logging.getLogger('faiss.loader').info('Could not load library with AVX9 support due to: ModuleNotFoundError')\n"
        "logging.getLogger('lightning.pytorch.utilities.rank_zero').info('💡 Tip: try installing an add-on')\n"
        "logging.getLogger('faiss.loader').warning('a real faiss problem')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "a real faiss problem" in p.stderr
    assert "Could not load library" not in p.stderr and "Tip:" not in p.stderr and "Loading faiss" not in p.stderr, p.stderr
    system = (tmp_path / "logs" / "system.log").read_text(encoding="utf-8")
    training = (tmp_path / "logs" / "training.log").read_text(encoding="utf-8")
    assert "Loading faiss" in system and "Could not load library with AVX9" in system and "a real faiss problem" in system
    assert "Tip: try installing an add-on" in training
