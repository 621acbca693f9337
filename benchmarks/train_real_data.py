"""Fine-tuned classifier vs a frozen-feature baseline on real data, same leak-free split, same run.

Baseline (the shared data README's method): frozen ImageNet EfficientNet-Lite0 features, one mean
prototype per character, cosine nearest prototype. Fine-tuned: `train.py experiment=<name>`.
Both use the split manifest the data module writes (near-duplicates on one side).

    python benchmarks/train_real_data.py --experiment mixed5            # train, then compare
    python benchmarks/train_real_data.py --experiment newgame_full --ckpt outputs/.../best.ckpt
    python benchmarks/train_real_data.py --experiment mixed5 -o trainer.max_epochs=3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import data_dir
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from anime_role_detect.cli import user_errors_exit
from anime_role_detect.data.transforms import build_eval_transform
from anime_role_detect.training.evaluation import predict_loader
from anime_role_detect.imageio import load_image
from anime_role_detect.models.backbones import backbone_data_config, create_backbone
from anime_role_detect.models.classifier import CharacterClassifier
from anime_role_detect.training import CONFIG_DIR, train

README_REFERENCE = {"newgame_full": 0.407, "mixed5": 0.878}  # frozen Lite0, random 80/20 split


@torch.no_grad()
def frozen_features(records, root, image_size: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised frozen ImageNet Lite0 features and integer labels for `records`."""
    model = create_backbone("efficientnet_lite0_offline", pretrained=True).eval()
    dc = backbone_data_config(model)
    tf = build_eval_transform(image_size, dc["mean"], dc["std"])
    feats = []
    for i in range(0, len(records), batch):
        x = torch.stack([tf(load_image(r.path(root))) for r in records[i : i + batch]])
        feats.append(torch.nn.functional.normalize(model(x), dim=-1))
    return torch.cat(feats)


def prototype_accuracy(dm) -> float:
    """Top-1 of nearest mean prototype (cosine) on the val split, prototypes from the train split."""
    idx = dm.class_to_idx
    ftr = frozen_features(dm.train_records, dm.root, dm.image_size)
    fva = frozen_features(dm.val_records, dm.root, dm.image_size)
    ytr = torch.tensor([idx[r.character] for r in dm.train_records])
    yva = torch.tensor([idx[r.character] for r in dm.val_records])
    protos = torch.stack([torch.nn.functional.normalize(ftr[ytr == c].mean(0), dim=0) for c in range(len(idx))])
    return float(((fva @ protos.T).argmax(1) == yva).float().mean())


@user_errors_exit
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, help="conf/experiment/<name>.yaml, e.g. mixed5, newgame_full")
    ap.add_argument("--ckpt", default=None, help="evaluate this checkpoint instead of training")
    ap.add_argument("-o", "--override", action="append", default=[], help="extra Hydra override (repeatable)")
    args = ap.parse_args()
    out = Path("outputs") / "bench_real" / f"{args.experiment}_{time.strftime('%Y%m%d_%H%M%S')}"
    real = data_dir() / args.experiment  # a real-data experiment is named after its set: read it from $ARD_DATA_DIR
    data_root = [f"data.root={real}"] if real.is_dir() else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={args.experiment}", f"paths.output_dir={out}", *data_root, *args.override])
    t0 = time.perf_counter()
    if args.ckpt:
        model = CharacterClassifier.load_from_checkpoint(args.ckpt, map_location="cpu")
        dm = instantiate(cfg.data, _convert_="all")
        dm.setup("fit")
        dm.set_normalization(model.mean, model.std)
        pred = predict_loader(model, dm.val_dataloader())
        tuned, ckpt = float((pred["y_true"] == pred["y_pred"]).mean()), args.ckpt
    else:
        result = train(cfg)
        dm = instantiate(cfg.data, _convert_="all")
        dm.setup("fit")
        tuned, ckpt = float(result.metrics["accuracy"]), result.ckpt_path
    tuned_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    base = prototype_accuracy(dm)
    base_s = time.perf_counter() - t1
    ref = README_REFERENCE.get(args.experiment)
    print(f"dataset {dm.root}: {len(dm.class_names)} characters, {len(dm.train_records)} train / {len(dm.val_records)} val "
          f"(near-duplicate-aware split {dm.split_path})")
    print(f"frozen Lite0 prototype baseline : {100 * base:5.1f}% top-1  ({base_s:.0f}s)")
    print(f"fine-tuned classifier           : {100 * tuned:5.1f}% top-1  ({tuned_s:.0f}s, {ckpt})")
    print(f"ratio fine-tuned / baseline     : {tuned / max(base, 1e-9):.2f}x")
    if ref is not None:
        print(f"README reference (random split) : {100 * ref:5.1f}% top-1 -> fine-tuned is {100 * (tuned - ref):+.1f} points")


if __name__ == "__main__":
    main()
