"""``ard-synthetic ROOT [n_characters] [images_per_character]`` (or ``python -m anime_role_detect.cli.synthetic``):
write a synthetic dataset folder (`data.synthetic.generate_dataset`)."""

from __future__ import annotations

import sys
from typing import Sequence

from ..data.synthetic import generate_dataset


def main(argv: Sequence[str] | None = None) -> None:
    """Generate ``ROOT`` with `n_characters` (default 8) x `images_per_character` (default 30) images."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if args else 2)
    n = int(args[1]) if len(args) > 1 else 8
    k = int(args[2]) if len(args) > 2 else 30
    recs = generate_dataset(args[0], n, k)
    print(f"wrote {len(recs)} images of {n} characters to {args[0]}")


if __name__ == "__main__":
    main()
