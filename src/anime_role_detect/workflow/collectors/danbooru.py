"""Danbooru-style JSON API: ``GET /posts.json?tags=<character_tag> solo&page=N&limit=L``.

Each post's ``tag_string_general`` becomes the image's tags (what the classifier's tag head learns);
``large_file_url`` (a ≤850 px sample) is downloaded by default, the original with
``file_field=file_url``. ``login`` + ``api_key`` are sent when configured.
"""

from __future__ import annotations

from typing import Any

import requests

from .base import BooruCollector, MalformedPage, Post


def _ext_of(url: str, fallback: str) -> str:
    tail = url.rsplit("/", 1)[-1].split("?", 1)[0]
    return tail.rsplit(".", 1)[-1].lower() if "." in tail else fallback


class DanbooruCollector(BooruCollector):
    """Collector for Danbooru and sites speaking its ``/posts.json`` API."""

    name = "danbooru"
    default_file_field = "large_file_url"

    def page_request(self, tags: str, page: int) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {"tags": tags, "page": page + 1, "limit": self.page_size}
        if self.login and self.api_key:
            params.update(login=self.login, api_key=self.api_key)
        return f"{self.base_url}/posts.json", params

    def parse_page(self, resp: requests.Response, search_tags: frozenset[str] = frozenset()) -> list[Post]:
        data = self.page_json(resp)
        if isinstance(data, dict) and "success" in data and not data.get("success", True):
            raise MalformedPage(f"API error: {data.get('message', data)}")
        posts = []
        for obj, url in self.post_objects(data):
            posts.append(Post(
                id=str(obj["id"]),
                file_url=url,
                ext=_ext_of(url, str(obj.get("file_ext") or "")) if url else str(obj.get("file_ext") or ""),
                tags=str(obj.get("tag_string_general") or "").split(),
                rating=str(obj.get("rating") or ""),
                group=str(obj.get("parent_id") or ""),
            ))
        return posts
