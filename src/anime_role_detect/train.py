"""``python -m anime_role_detect.train [key=value ...]``: the repo's ``train.py`` for installed packages (`cli.train`)."""

from .cli.train import main

if __name__ == "__main__":
    main()
