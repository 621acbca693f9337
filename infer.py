"""Name the characters in an image, a folder of images or a video: ``python infer.py image=PATH``.

Thin Hydra entry point (conf/infer.yaml); the work happens in `anime_role_detect.recognition`.
Options: ``mode=clip|model|fusion``, ``rerank=true|false``, ``version=latest|<id>`` or ``gallery=FOLDER``,
``output.format=jsonl|csv|json``, ``output.path=FILE``. See docs/recognition.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from anime_role_detect.cli import user_errors_exit
from anime_role_detect.fusion.featurelog import attach_from_config
from anime_role_detect.recognition.infer_run import run_infer


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    """Recognise `image=` or `video=` and write the answers (each also logged for log fusion)."""
    run_infer(cfg, on_recognizer=attach_from_config(cfg.get("feature_log")))


if __name__ == "__main__":
    main()
