"""``gallery_build.flip_rows``: each training picture's gallery row is the mean of the picture and its mirror image, so a
query facing the other way meets the same row, while queries (and the embedder the version records) stay one view."""

from __future__ import annotations

import numpy as np
from PIL import ImageOps

from .helpers import infer_cfg

LITE0_64 = ["embedder=lite0", "embedder.image_size=64", "embedder.flip_tta=false", "tagger=none"]


def test_flip_rows_make_a_row_that_a_mirrored_query_meets_as_the_picture_itself(tmp_path, rec_data):
    from anime_role_detect.data.layout import scan_dataset
    from anime_role_detect.imageio import load_image
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.recognition.gallery import Gallery
    from anime_role_detect.recognition.pipeline import Recognizer

    files = sorted(r.file_name for r in scan_dataset(rec_data))
    val = [f for i, f in enumerate(files) if i % 6 == 0]  # a few of each character's pictures
    train = [f for f in files if f not in val]
    folders = {}
    for flip in (False, True):
        folders[flip] = tmp_path / f"v{flip}"
        build_recognition_folder(rec_data, folders[flip], infer_cfg([*LITE0_64, f"gallery_build.flip_rows={str(flip).lower()}"]),
                                 split=(train, val), include_val=False)
    flipped, plain = Gallery.load(folders[True]), Gallery.load(folders[False])
    assert flipped.embedder_config["flip_tta"] is False and flipped.embedder_id == plain.embedder_id  # queries: one view
    rec = Recognizer.from_version(folders[True], {**infer_cfg(), "cache_size": 0})
    picture = load_image(rec_data / train[0])
    one_view, mirrored = rec.embedder.embed([picture, ImageOps.mirror(picture)])
    assert float(one_view @ mirrored) < 0.999  # the network does see the mirror image as another picture
    vectors, _, sources = flipped.live_rows()
    row = vectors[sources.index(train[0])]
    plain_vectors, _, plain_sources = plain.live_rows()
    assert np.allclose(plain_vectors[plain_sources.index(train[0])], one_view, atol=1e-5)  # without the option: one view
    # with it the row sits between the two views, and each of them meets it alike
    assert abs(float(row @ one_view) - float(row @ mirrored)) < 1e-4
    assert float(row @ mirrored) > float(one_view @ mirrored)
