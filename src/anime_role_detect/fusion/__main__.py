"""``python -m anime_role_detect.fusion log_dir=... registry_dir=...`` / ``ard-fusion``: fuse the feature log into a new version (conf/fusion.yaml).

With ``export_dir=DIR`` it instead writes the selected logged uploads (when stored) as a dataset folder for fine-tuning.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from ..cli import hydra_main
from ..log import setup_logging


@hydra_main("fusion")
def main(cfg: DictConfig) -> None:
    """Run one fusion and print its report as one JSON line (exit 0 also when the new version was rejected)."""
    from .fuse import export_dataset, fuse

    setup_logging(cfg.get("log"))
    plain = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("export_dir"):
        print(json.dumps(export_dataset(plain)))
        return
    result = fuse(plain)
    r = result.report
    print(json.dumps({"decision": r["decision"], "reason": r["reason"], "version_id": result.version_id,
                      "added": {c: sum(d.values()) for c, d in r["added_per_character"].items()}, "metrics": r["metrics"],
                      "finetune": {k: r["finetune"].get(k) for k in ("decision", "reason", "metrics") if k in r["finetune"]}}))


if __name__ == "__main__":
    main()
