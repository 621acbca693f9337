"""`/api/characters`: list the gallery, enrol a new character from a few images (no retraining), remove one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, UploadFile
from PIL import Image
from pydantic import BaseModel, Field

from ...imageio import content_hash
from ..deps import LiveDep, Services, ServicesDep, require_token, reading, run_model, writing
from ..errors import ApiError
from ..live import Loaded
from ..uploads import check_count, decode_upload, read_upload
from ..workflow_schema import NAME_PATTERN
from . import ERROR_RESPONSES

router = APIRouter(prefix="/api/characters", tags=["gallery"])


class CharacterInfo(BaseModel):
    """A character the live gallery can name."""

    name: str = Field(description="Character name.")
    series: str = Field(default="", description="Series (work) it is from.")
    prototypes: int = Field(default=0, description="Gallery vectors that represent it.")


class CharacterList(BaseModel):
    """The live gallery's characters."""

    version: str = Field(description="Registry version serving now.")
    count: int = Field(description="Number of characters.")
    characters: list[CharacterInfo] = Field(description="Characters, sorted by name.")


class EnrollResult(BaseModel):
    """What an enrolment added."""

    name: str = Field(description="Character enrolled.")
    series: str = Field(description="Its series.")
    added: int = Field(description="Gallery vectors added. With the recognizer's enrol.mirror (the default) each image "
                                   "used is embedded with its mirror image, so a gallery keeping every sample (prototypes "
                                   "`all`, the default) gains two rows per image.")
    images: int = Field(description="Images received.")
    held_out: int = Field(default=0, description="Images kept out of the gallery to evaluate the character on "
                                                   "(one in five from five images on, when edits are saved as versions).")
    version: str = Field(description="Registry version serving now.")


class RemoveResult(BaseModel):
    """What a removal took out."""

    name: str = Field(description="Character removed.")
    removed: int = Field(description="Gallery vectors removed.")
    version: str = Field(description="Registry version serving now.")


def _characters(loaded: Loaded) -> list[CharacterInfo]:
    with reading(loaded) as rec:
        rows = rec.characters()
    return sorted((CharacterInfo(name=r["name"], series=r.get("series") or "", prototypes=int(r.get("prototypes", 0))) for r in rows),
                  key=lambda c: c.name)


@router.get("", response_model=CharacterList, summary="List the characters the live gallery knows", responses=ERROR_RESPONSES)
async def list_characters(services: ServicesDep, loaded: LiveDep) -> CharacterList:
    """Every character the live version can name, trained or enrolled, with its series and gallery rows."""
    chars = await run_model(services, _characters, loaded)
    return CharacterList(version=loaded.version_id, count=len(chars), characters=chars)


def _enroll(services: Services, loaded: Loaded, name: str, series: str, shots: list[tuple[Image.Image, str]]) -> tuple[int, int]:
    """Enrol `name`; when edits become versions, one shot in five (from five on) is held out as its evaluation pictures."""
    persist = services.settings.persist_gallery_edits
    held_idx = {i for i in range(len(shots)) if persist and len(shots) >= 5 and i % 5 == 4}
    held = [shot for i, shot in enumerate(shots) if i in held_idx]
    used = [shot for i, shot in enumerate(shots) if i not in held_idx]
    with writing(loaded) as rec:
        added = int(rec.enroll(name, series, [img for img, _ in used]))
        if persist:
            services.live.persist_edit(loaded, kind="enroll", what=name, evaluate=[(img, name, sha) for img, sha in held])
        return added, len(held)


@router.post("", response_model=EnrollResult, status_code=201, dependencies=[Depends(require_token)],
             summary="Enrol a new character from a few images (no retraining)", responses=ERROR_RESPONSES)
async def enroll_character(
    services: ServicesDep,
    loaded: LiveDep,
    name: Annotated[str, Form(pattern=NAME_PATTERN, description="Character name (letters, digits, space, _ . ' ( ) -).")],
    files: Annotated[list[UploadFile], File(description="A few images of the character (one character per image works best).")],
    series: Annotated[str, Form(max_length=80, description="Series (work) it is from.")] = "",
) -> EnrollResult:
    """Embeds the images and adds them to the live gallery; later requests can name the character at once."""
    limits = services.settings.limits
    check_count(files, limits, "images")
    shots = []
    for i, f in enumerate(files):
        up = await read_upload(f, limits, index=i, allow_video=False)
        shots.append((await run_model(services, decode_upload, up, limits), content_hash(up.data)))
    added, held = await run_model(services, _enroll, services, loaded, name.strip(), series.strip(), shots)
    return EnrollResult(name=name.strip(), series=series.strip(), added=added, images=len(shots), held_out=held,
                        version=loaded.version_id)


def _remove(services: Services, loaded: Loaded, name: str) -> int:
    with writing(loaded) as rec:
        removed = int(rec.remove(name))
        if removed and services.settings.persist_gallery_edits:
            services.live.persist_edit(loaded, kind="remove", what=name)
        return removed


@router.delete("/{name}", response_model=RemoveResult, dependencies=[Depends(require_token)],
               summary="Remove a character from the live gallery", responses=ERROR_RESPONSES)
async def remove_character(services: ServicesDep, loaded: LiveDep,
                           name: Annotated[str, Path(max_length=200, description="Character name as listed.")]) -> RemoveResult:
    """Delete the character's gallery rows, so it is no longer named (404 when it has none); with
    `persist_gallery_edits` the edit is saved as a new registry version and outlives a restart."""
    removed = await run_model(services, _remove, services, loaded, name)
    if not removed:
        raise ApiError(404, f"character {name!r} is not in the gallery; GET /api/characters lists the names", {"name": name})
    return RemoveResult(name=name, removed=removed, version=loaded.version_id)
