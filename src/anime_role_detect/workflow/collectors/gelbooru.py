"""Gelbooru/Safebooru-style API: ``GET /index.php?page=dapi&s=post&q=index&json=1&tags=...&pid=N&limit=L``.

Gelbooru answers ``{"@attributes": ..., "post": [...]}``, Safebooru a bare list (or an empty body
when nothing matches); both are read. Tags are not typed here, so the image keeps every tag except
the search tags. ``user_id`` + ``api_key`` are sent when configured.
"""

from __future__ import annotations

from typing import Any

import requests

from .base import BooruCollector, MalformedPage, Post

_RATING = {"general": "g", "safe": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}


class GelbooruCollector(BooruCollector):
    """Collector for Gelbooru 0.2-style ``dapi`` JSON (Gelbooru, Safebooru, Rule34-style forks)."""

    name = "gelbooru"

    def page_request(self, tags: str, page: int) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {"page": "dapi", "s": "post", "q": "index", "json": 1, "tags": tags,
                                  "pid": page, "limit": self.page_size}
        if self.login and self.api_key:
            params.update(user_id=self.login, api_key=self.api_key)
        return f"{self.base_url}/index.php", params

    def parse_page(self, resp: requests.Response, search_tags: frozenset[str] = frozenset()) -> list[Post]:
        if not resp.content.strip():
            return []  # Safebooru: empty body = no results
        data = self.page_json(resp)
        if isinstance(data, dict):
            if "post" not in data:
                if "@attributes" in data:
                    return []
                raise MalformedPage(f"no 'post' list in answer with keys {sorted(data)[:5]}")
            data = data["post"]
            data = [data] if isinstance(data, dict) else data
        posts = []
        for obj, url in self.post_objects(data):
            if not url and obj.get("image") and obj.get("directory") is not None:
                url = f"{self.base_url}/images/{obj['directory']}/{obj['image']}"
            ext = url.rsplit("/", 1)[-1].split("?", 1)[0].rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
            rating = str(obj.get("rating") or "")
            parent = obj.get("parent_id")
            posts.append(Post(
                id=str(obj["id"]),
                file_url=url,
                ext=ext,
                tags=[t for t in str(obj.get("tags") or "").split() if t not in search_tags],
                rating=_RATING.get(rating, rating[:1]),
                group=str(parent) if parent not in (None, "", 0, "0") else "",
            ))
        return posts
