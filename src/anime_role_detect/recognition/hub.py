"""Hugging Face hub weights by name: a (repo_id, filename, revision) becomes a local file in the hub's normal cache.

Every pluggable weight (WD/DeepDanbooru tagger, open_clip and timm ``hf-hub:`` models, a YOLO
``.pt``) goes through `hub_files`, which downloads once with ``huggingface_hub`` and finds the
file again offline. The cache folder and offline mode are read from the environment on every call
(``HF_HUB_CACHE`` > ``HUGGINGFACE_HUB_CACHE`` > ``HF_HOME``/hub > ``~/.cache/huggingface/hub``;
``HF_HUB_OFFLINE``), not from huggingface_hub's import-time constants. Every failure (offline with
nothing cached, unknown repo/revision/file, gated repo) is one-line `WeightsError` naming the repo,
the ``hf download`` command that pre-fetches it and the local-file alternative.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, WeightsError

#: ``org/name`` (the hub's repo id form; also accepts a bare ``name`` of a legacy canonical repo).
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's own truthy spellings

def hub_cache_dir() -> Path:
    """The hub cache folder huggingface_hub would use, read from the environment now (tests and users may change it)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(os.path.expandvars(env[key])).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) says: never touch the network, use the cache only."""
    return any(os.environ.get(k, "").strip().upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); an explicit `revision` wins over the ``@rev`` suffix."""
    repo, _, at = str(spec).strip().partition("@")
    return repo, (revision or at or None)


def download_command(repo_id: str, filenames: Sequence[str], revision: str | None = None) -> str:
    """The ``hf download`` command (huggingface_hub's CLI) that puts these files in the cache."""
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id} {' '.join(filenames)}{rev}"


def _choices(files: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[f] if isinstance(f, str) else [str(x) for x in f] for f in files]


def _snapshot_commit(path: Path) -> str | None:
    """The commit folder a cached file lives in (``.../snapshots/<commit>/file``), to pin the repo's other files to it."""
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def hub_files(repo_id: str, files: Sequence[str | Sequence[str]], revision: str | None = None, *,
              what: str = "weights", local_hint: str = "give a local file instead") -> list[Path]:
    """Local paths of `files` of hub repo `repo_id` (each a name or alternatives tried in order), all from one commit.

    Downloads into the hub cache when online; offline (``HF_HUB_OFFLINE=1`` or no network) it uses
    the cache only. `what` names the weights in errors ("tagger", "open_clip model"), `local_hint`
    says how to use a local file instead ("or set tagger.model_path").
    """
    repo_id = str(repo_id or "").strip()
    if not _REPO_RE.match(repo_id):
        raise ConfigError(f"{what}: {repo_id!r} is not a Hugging Face hub repo id (org/name); fix the repo id or {local_hint}")
    choices = _choices(files)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency of timm/open_clip
        raise WeightsError(f"{what} from hub repo {repo_id} needs huggingface_hub; pip install huggingface_hub, or {local_hint}") from None
    out: list[Path] = []
    for names in choices:
        out.append(_one_file(hf_hub_download, repo_id, names, revision, choices, what, local_hint))
        revision = revision if revision and len(revision) == 40 else (_snapshot_commit(out[-1]) or revision)
    return out


def hub_file(repo_id: str, filename: str | Sequence[str], revision: str | None = None, *,
             what: str = "weights", local_hint: str = "give a local file instead") -> Path:
    """Local path of one file (or the first present of several alternatives) of hub repo `repo_id`."""
    return hub_files(repo_id, [filename], revision, what=what, local_hint=local_hint)[0]


def _one_file(download, repo_id: str, names: list[str], revision: str | None, choices: list[list[str]],
              what: str, local_hint: str) -> Path:
    """The first of `names` the repo has, translating huggingface_hub's errors into one-line user errors."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    every = [n for group in choices for n in group]
    fetch = f"pre-download it with `{download_command(repo_id, every, revision)}`"
    offline, not_cached = hub_offline(), False
    for name in names:
        try:
            return Path(download(repo_id, name, revision=revision, cache_dir=str(hub_cache_dir()), local_files_only=offline))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            not_cached = True  # an alternative may still be cached: try it
        except GatedRepoError:
            raise WeightsError(f"{what}: hub repo {repo_id} is gated; accept its terms on huggingface.co and run `hf auth login`, or {local_hint}") from None
        except RepositoryNotFoundError:
            raise WeightsError(f"{what}: hub repo {repo_id} does not exist (or is private); fix the repo id, or {local_hint}") from None
        except RevisionNotFoundError:
            raise WeightsError(f"{what}: hub repo {repo_id} has no revision {revision!r}; fix the revision, or {local_hint}") from None
        except EntryNotFoundError:
            pass  # the repo has no such file: try the next alternative
        except HFValidationError as exc:
            raise ConfigError(f"{what}: bad hub repo id or revision {repo_id}{at} ({str(exc).splitlines()[0]}); fix it, or {local_hint}") from None
        except OSError as exc:  # HTTP errors, disk full, ...
            first = (str(exc).splitlines() or [""])[0][:160]
            raise WeightsError(f"{what} {repo_id}{at} could not be downloaded ({type(exc).__name__}: {first}); {fetch}, or {local_hint}") from None
    if not_cached:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise WeightsError(
            f"{what} {repo_id}{at} ({' or '.join(names)}) is not in the Hugging Face cache {hub_cache_dir()} and {why}; "
            f"{fetch}, or {local_hint}"
        )
    raise WeightsError(f"{what}: hub repo {repo_id}{at} has no file {' or '.join(names)}; fix the file name, or {local_hint}")
