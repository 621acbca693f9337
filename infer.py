"""Name the characters in an image, a folder of images or a video: ``python infer.py image=PATH``.

Thin entry point (conf/infer.yaml, through `anime_role_detect.cli.infer`); same as ``ard-infer``.
Options: ``mode=clip|model|fusion``, ``rerank=true|false``, ``version=latest|<id>`` or ``gallery=FOLDER``,
``output.format=jsonl|csv|json``, ``output.path=FILE``. See docs/recognition.md.
"""

from anime_role_detect.cli.infer import main

if __name__ == "__main__":
    main()
