"""Helpers shared by the recognition tests: compose the real Hydra configs with overrides."""

from __future__ import annotations

from pathlib import Path

from anime_role_detect.confutil import CONFIG_DIR

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRAIN_CHARS = 8

def compose(config_name: str, overrides: list[str]):
    """`conf/<config_name>.yaml` composed exactly as the entry point would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def infer_cfg(overrides: list[str] | None = None) -> dict:
    """`conf/infer.yaml` composed with overrides, as a plain dict."""
    from anime_role_detect.confutil import compose_plain

    return compose_plain("infer", overrides or [])


def train_onnx_tagger(data_root: Path, out_dir: Path, epochs: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Train a small multi-label CNN on the dataset's metadata tags and export it WD14-style.

    The export takes NHWC float BGR 0-255 at the data's own size and outputs probabilities, with a
    ``selected_tags.csv`` (tag_id, name, category, count): exactly what a WD14 tagger download looks like.
    It sees the full-resolution image while the tiny classifier works at 64 px, like a real tagger
    (448 px) next to a 224 px character embedder.
    """
    import random

    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    from anime_role_detect.data.layout import scan_dataset, tag_vocabulary

    torch.manual_seed(seed)
    rng = random.Random(seed)
    recs = scan_dataset(data_root)
    tags = [t for t in tag_vocabulary(recs, 2) if t not in ("1girl", "solo")]
    x = torch.from_numpy(np.stack([np.asarray(Image.open(r.path(data_root)).convert("RGB"), np.float32)[:, :, ::-1] for r in recs]).copy())
    y = torch.tensor([[t in r.tags for t in tags] for r in recs], dtype=torch.float32)

    class Tagger(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))  # noqa: E731
            self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 48), block(48, 64))
            self.head = nn.Linear(128, n)

        def forward(self, img: torch.Tensor) -> torch.Tensor:  # NHWC, BGR, 0-255
            f = self.features(img.permute(0, 3, 1, 2) / 255.0)
            return torch.sigmoid(self.head(torch.cat([f.amax((2, 3)), f.mean((2, 3))], 1)))

    model = Tagger(len(tags))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            xb = x[idx].flip(2) if rng.random() < 0.5 else x[idx]
            loss = nn.functional.binary_cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, csv_path = out_dir / "model.onnx", out_dir / "selected_tags.csv"
    torch.onnx.export(model, x[:1], str(onnx_path), input_names=["input_1"], output_names=["predictions_sigmoid"],
                      dynamic_axes={"input_1": {0: "batch"}}, dynamo=False)
    counts = y.sum(0).tolist()
    csv_path.write_text("tag_id,name,category,count\n" + "".join(f"{i},{t},0,{int(c)}\n" for i, (t, c) in enumerate(zip(tags, counts))))
    return onnx_path, csv_path
