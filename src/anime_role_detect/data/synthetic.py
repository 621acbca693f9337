"""Procedural "characters": drawn figures whose identity is a fixed combination of attributes.

Identity = (hair colour, eye colour, hair style, accessory, outfit colour). Near-twins differ in a
single attribute (the "sameface" problem tags exist to solve); pose, scale, background, clutter and
colour noise vary per image, so a model cannot score 100% after one batch. ``domain`` changes the
drawing style (background, line weight, tint) to simulate a new art style for fusion tests.

Writes the standard dataset folder: ``ROOT/<character>/<n>.png`` + ``metadata.jsonl`` with tags
(command line: ``ard-synthetic ROOT [n_characters] [images_per_character]``, `cli.synthetic`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFilter

from .layout import ImageRecord, write_metadata

HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (30, 30, 38), "blonde": (240, 214, 110), "brown": (120, 72, 40), "red": (200, 40, 40),
    "blue": (60, 100, 220), "pink": (245, 140, 190), "silver": (200, 200, 215), "green": (60, 170, 90),
    "purple": (140, 70, 190), "orange": (245, 140, 40),
}
EYE_COLORS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 90, 230), "red": (220, 30, 30), "green": (30, 170, 60), "yellow": (235, 200, 20),
    "purple": (150, 50, 200), "brown": (110, 60, 30),
}
HAIR_STYLES = ("short", "long", "twintails", "ponytail")
ACCESSORIES = ("none", "ribbon", "hat", "glasses", "cat_ears")
OUTFIT_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235), "black": (40, 40, 45), "red": (190, 40, 50), "blue": (50, 70, 170),
    "green": (50, 130, 70), "yellow": (230, 200, 60), "pink": (235, 150, 190),
}
_STYLE_TAG = {"short": "short_hair", "long": "long_hair", "twintails": "twintails", "ponytail": "ponytail"}
_ACC_TAG = {"ribbon": "hair_ribbon", "hat": "hat", "glasses": "glasses", "cat_ears": "animal_ears"}
NOISE_TAGS = ("smile", "open_mouth", "outdoors", "simple_background", "looking_at_viewer", "upper_body")
DOMAINS = ("default", "sketch", "night")

_ATTRS = ("hair_color", "eye_color", "hair_style", "accessory", "outfit_color")
_CHOICES = {
    "hair_color": tuple(HAIR_COLORS), "eye_color": tuple(EYE_COLORS), "hair_style": HAIR_STYLES,
    "accessory": ACCESSORIES, "outfit_color": tuple(OUTFIT_COLORS),
}


@dataclass(frozen=True)
class CharacterSpec:
    """A synthetic character: a name, a series and the attribute combination that defines it."""

    name: str
    series: str
    hair_color: str
    eye_color: str
    hair_style: str
    accessory: str
    outfit_color: str

    def attributes(self) -> tuple[str, ...]:
        return tuple(getattr(self, a) for a in _ATTRS)

    def tags(self) -> list[str]:
        """Danbooru-style identity tags of this character."""
        t = [f"{self.hair_color}_hair", f"{self.eye_color}_eyes", _STYLE_TAG[self.hair_style], f"{self.outfit_color}_shirt"]
        if self.accessory != "none":
            t.append(_ACC_TAG[self.accessory])
        return t


def make_characters(n: int, seed: int = 0, twin_fraction: float = 0.5, n_series: int = 3, prefix: str = "char") -> list[CharacterSpec]:
    """`n` distinct characters; about `twin_fraction` of them are near-twins of an earlier one.

    A twin differs from its sibling in exactly one of eye colour, accessory or hair style.
    """
    rng = random.Random(seed)
    out: list[CharacterSpec] = []
    seen: set[tuple[str, ...]] = set()
    series_names = [f"series_{chr(ord('a') + i)}" for i in range(max(1, n_series))]
    while len(out) < n:
        i = len(out)
        name = f"{prefix}_{i:02d}"
        if out and rng.random() < twin_fraction:
            base = rng.choice(out)
            attr = rng.choice(("eye_color", "accessory", "hair_style"))
            value = rng.choice([v for v in _CHOICES[attr] if v != getattr(base, attr)])
            spec = replace(base, name=name, **{attr: value})
        else:
            spec = CharacterSpec(name=name, series=rng.choice(series_names), **{a: rng.choice(_CHOICES[a]) for a in _ATTRS})
        if spec.attributes() in seen:
            continue
        seen.add(spec.attributes())
        out.append(spec)
    return out


def _jitter(c: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in c)  # type: ignore[return-value]


def _background(size: tuple[int, int], rng: random.Random, domain: str) -> Image.Image:
    w, h = size
    if domain == "night":
        base = (rng.randint(5, 40), rng.randint(5, 40), rng.randint(30, 80))
    elif domain == "sketch":
        base = (rng.randint(225, 250),) * 3
    else:
        base = (rng.randint(120, 250), rng.randint(120, 250), rng.randint(120, 250))
    img = Image.new("RGB", size, base)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 7)):  # clutter
        x0, y0 = rng.randint(-w // 4, w), rng.randint(-h // 4, h)
        x1, y1 = x0 + rng.randint(w // 10, w // 2), y0 + rng.randint(h // 10, h // 2)
        col = _jitter(base, rng, 60)
        if domain == "night":
            d.line([(x0, y0), (x1, y1)], fill=(rng.randint(150, 255),) * 3, width=1)
        elif rng.random() < 0.5:
            d.rectangle([x0, y0, x1, y1], fill=col)
        else:
            d.ellipse([x0, y0, x1, y1], fill=col)
    return img


def _draw_figure(img: Image.Image, spec: CharacterSpec, box: tuple[int, int, int, int], rng: random.Random, domain: str) -> None:
    """Draw `spec` inside `box` (x0, y0, x1, y1): body, head, hair, eyes, accessory."""
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = x0 + w / 2 + rng.uniform(-0.04, 0.04) * w
    line = (20, 20, 20) if domain != "sketch" else (60, 60, 60)
    lw = max(1, int(w / 60)) * (2 if domain == "sketch" else 1)
    amt = 25
    hair = _jitter(HAIR_COLORS[spec.hair_color], rng, amt)
    eye = _jitter(EYE_COLORS[spec.eye_color], rng, amt)
    outfit = _jitter(OUTFIT_COLORS[spec.outfit_color], rng, amt)
    skin = _jitter((250, 220, 195), rng, 12)
    if domain == "sketch":  # washed-out colours, heavy outline
        hair, eye, outfit = (tuple(int(v * 0.6 + 100) for v in c) for c in (hair, eye, outfit))  # type: ignore[assignment]
    head_r = w * rng.uniform(0.2, 0.24)
    head_cy = y0 + h * 0.3
    # body (full figure: torso + legs)
    d.polygon([(cx - w * 0.28, y1), (cx + w * 0.28, y1), (cx + w * 0.18, head_cy + head_r * 0.9), (cx - w * 0.18, head_cy + head_r * 0.9)], fill=outfit, outline=line)
    # back hair
    if spec.hair_style == "long":
        d.rectangle([cx - head_r * 1.15, head_cy - head_r * 0.2, cx + head_r * 1.15, head_cy + head_r * 2.4], fill=hair)
    elif spec.hair_style == "twintails":
        for s in (-1, 1):
            d.ellipse([cx + s * head_r * 1.25 - head_r * 0.45, head_cy - head_r * 0.2, cx + s * head_r * 1.25 + head_r * 0.45, head_cy + head_r * 2.2], fill=hair, outline=line)
    elif spec.hair_style == "ponytail":
        d.ellipse([cx + head_r * 0.7, head_cy - head_r * 0.9, cx + head_r * 1.7, head_cy + head_r * 1.6], fill=hair, outline=line)
    # face
    d.ellipse([cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r], fill=skin, outline=line, width=lw)
    # fringe
    d.chord([cx - head_r * 1.05, head_cy - head_r * 1.1, cx + head_r * 1.05, head_cy + head_r * 0.5], 180, 360, fill=hair, outline=line)
    if spec.hair_style == "short":
        d.rectangle([cx - head_r * 1.05, head_cy - head_r * 0.3, cx - head_r * 0.8, head_cy + head_r * 0.5], fill=hair)
        d.rectangle([cx + head_r * 0.8, head_cy - head_r * 0.3, cx + head_r * 1.05, head_cy + head_r * 0.5], fill=hair)
    # eyes
    er = head_r * 0.2
    for s in (-1, 1):
        ex, ey = cx + s * head_r * 0.42, head_cy + head_r * 0.2
        d.ellipse([ex - er, ey - er * 1.3, ex + er, ey + er * 1.3], fill=eye, outline=line)
        d.ellipse([ex - er * 0.35, ey - er * 0.8, ex + er * 0.1, ey - er * 0.2], fill=(255, 255, 255))
    # mouth
    d.arc([cx - head_r * 0.2, head_cy + head_r * 0.45, cx + head_r * 0.2, head_cy + head_r * 0.7], 0, 180, fill=line, width=lw)
    acc = spec.accessory
    if acc == "ribbon":
        rc = _jitter((230, 30, 60), rng, 20)
        bx, by = cx + head_r * 0.6, head_cy - head_r * 0.9
        d.polygon([(bx, by), (bx - head_r * 0.5, by - head_r * 0.3), (bx - head_r * 0.5, by + head_r * 0.3)], fill=rc, outline=line)
        d.polygon([(bx, by), (bx + head_r * 0.5, by - head_r * 0.3), (bx + head_r * 0.5, by + head_r * 0.3)], fill=rc, outline=line)
    elif acc == "hat":
        hc = _jitter((60, 40, 30), rng, 20)
        d.rectangle([cx - head_r * 1.3, head_cy - head_r * 1.0, cx + head_r * 1.3, head_cy - head_r * 0.8], fill=hc, outline=line)
        d.rectangle([cx - head_r * 0.8, head_cy - head_r * 1.8, cx + head_r * 0.8, head_cy - head_r * 0.95], fill=hc, outline=line)
    elif acc == "glasses":
        for s in (-1, 1):
            ex, ey = cx + s * head_r * 0.42, head_cy + head_r * 0.2
            d.ellipse([ex - er * 1.6, ey - er * 1.6, ex + er * 1.6, ey + er * 1.6], outline=(10, 10, 10), width=max(1, lw))
    elif acc == "cat_ears":
        for s in (-1, 1):
            ex = cx + s * head_r * 0.6
            d.polygon([(ex - head_r * 0.35, head_cy - head_r * 0.8), (ex + head_r * 0.35, head_cy - head_r * 0.8), (ex + s * head_r * 0.1, head_cy - head_r * 1.6)], fill=hair, outline=line)


def render_character(
    spec: CharacterSpec, rng: random.Random, size: int = 128, domain: str = "default"
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of `spec` with pose/scale/background/colour noise; returns (image, figure box)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose from {DOMAINS}")
    img = _background((size, size), rng, domain)
    scale = rng.uniform(0.6, 0.95)
    fw, fh = int(size * scale * 0.75), int(size * scale)
    x0 = rng.randint(0, size - fw)
    y0 = rng.randint(0, size - fh)
    box = (x0, y0, x0 + fw, y0 + fh)
    _draw_figure(img, spec, box, rng, domain)
    angle = rng.uniform(-12, 12)
    img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=img.getpixel((0, 0)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if domain == "night":
        img = Image.blend(img, Image.new("RGB", img.size, (20, 10, 60)), 0.25)
    return img, box


def render_scene(
    specs: Sequence[CharacterSpec], rng: random.Random, size: tuple[int, int] = (384, 256), domain: str = "default"
) -> tuple[Image.Image, list[tuple[CharacterSpec, tuple[int, int, int, int]]]]:
    """Several characters side by side (no overlap) on one background; returns image and boxes."""
    w, h = size
    img = _background(size, rng, domain)
    slot = w / max(1, len(specs))
    out = []
    for i, spec in enumerate(specs):
        fh = int(h * rng.uniform(0.7, 0.95))
        fw = int(min(slot * 0.9, fh * 0.75))
        x0 = int(i * slot + rng.uniform(0, max(0.0, slot - fw)))
        y0 = rng.randint(0, h - fh)
        box = (x0, y0, x0 + fw, y0 + fh)
        _draw_figure(img, spec, box, rng, domain)
        out.append((spec, box))
    return img, out


def image_tags(spec: CharacterSpec, rng: random.Random, noise: float = 0.3) -> list[str]:
    """Per-image tags: identity tags (one sometimes dropped, like real booru tagging) + random noise tags."""
    tags = spec.tags()
    if len(tags) > 2 and rng.random() < 0.15:
        tags.pop(rng.randrange(len(tags)))
    tags += [t for t in NOISE_TAGS if rng.random() < noise]
    return sorted(set(tags + ["1girl", "solo"]))


def generate_dataset(
    root: str | Path,
    n_characters: int = 8,
    images_per_character: int = 30,
    size: int = 128,
    seed: int = 0,
    twin_fraction: float = 0.5,
    domain: str = "default",
    characters: Sequence[CharacterSpec] | None = None,
) -> list[ImageRecord]:
    """Write a synthetic dataset folder (images + ``metadata.jsonl``); returns its records."""
    root = Path(root)
    specs = list(characters) if characters is not None else make_characters(n_characters, seed, twin_fraction)
    rng = random.Random(seed * 7919 + 17)
    records: list[ImageRecord] = []
    for spec in specs:
        cdir = root / spec.name
        cdir.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_character):
            img, _ = render_character(spec, rng, size, domain)
            rel = f"{spec.name}/{domain}_{k:04d}.png"
            img.save(root / rel)
            records.append(
                ImageRecord(file_name=rel, character=spec.name, series=spec.series, tags=image_tags(spec, rng), source=f"synthetic:{domain}:{seed}")
            )
    write_metadata(root, records)
    (root / "characters.json").write_text(
        __import__("json").dumps([asdict(s) for s in specs], indent=1), encoding="utf-8"
    )
    return records


def load_characters(root: str | Path) -> list[CharacterSpec]:
    """The specs saved next to a generated dataset (``characters.json``)."""
    import json

    return [CharacterSpec(**o) for o in json.loads((Path(root) / "characters.json").read_text(encoding="utf-8"))]


def ensure_dataset(root: str | Path, **kwargs) -> Path:
    """Generate the synthetic dataset at `root` unless it is already there (the embedded demo default)."""
    root = Path(root)
    if not (root / "metadata.jsonl").exists():
        generate_dataset(root, **kwargs)
    return root


def write_samples(root: str | Path, out_dir: str | Path, per_character: int = 3, size: int = 128, seed: int = 1) -> list[Path]:
    """Fresh renders of a generated dataset's characters (never its training images): ``out_dir/<character>_<n>.png``.

    Pictures to try a model trained on `root` with (the demo writes them next to its live version); earlier
    samples in `out_dir` are replaced.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    rng = random.Random(seed * 104729 + 3)  # a different stream than generate_dataset's
    paths: list[Path] = []
    for spec in load_characters(root):
        for k in range(1, per_character + 1):
            img, _ = render_character(spec, rng, size)
            path = out / f"{spec.name}_{k}.png"
            img.save(path)
            paths.append(path)
    return paths

