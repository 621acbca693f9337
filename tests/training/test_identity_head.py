"""The identity embedding head (`model.embedding`): a margin loss that pulls each character to its own centre, and
a checkpoint whose classifier gallery searches that embedding (unit length, its own size) from one backbone pass."""

from __future__ import annotations

import pytest
import torch

from anime_role_detect.errors import ConfigError
from anime_role_detect.models.classifier import CharacterClassifier
from anime_role_detect.models.metric import EmbeddingSpec, IdentityHead

TINY = {"name": "resnet10t", "pretrained": False, "weights_path": None}


@pytest.mark.parametrize("loss", ["subcenter_arcface", "arcface", "cosface"])
def test_margin_loss_separates_characters_with_a_margin(loss):
    """Features of 4 characters that overlap: after training the head alone, every picture is nearer its own centre
    than any other by more than the cosine margin the loss asked for (the softmax boundary alone does not ask it)."""
    torch.manual_seed(0)
    centres = torch.randn(4, 32)
    y = torch.arange(4).repeat_interleave(64)
    feats = centres[y] + 0.6 * torch.randn(len(y), 32)
    head = IdentityHead(32, 4, EmbeddingSpec(dim=16, loss=loss, margin=0.2, scale=16.0))
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss_value = head.loss(head(feats), y)
        first = float(loss_value.detach()) if first is None else first
        loss_value.backward()
        opt.step()
    assert float(loss_value) < 0.5 * first
    with torch.no_grad():
        emb = head(feats)
        cos = head.cosines(emb)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(y)), atol=1e-5)
    own = cos.gather(1, y[:, None]).squeeze(1)
    other = cos.masked_fill(torch.nn.functional.one_hot(y, 4).bool(), -2).amax(1)
    assert float((own > other).float().mean()) >= 0.97
    assert float((own - other).median()) > 0.2


def test_supcon_pulls_each_character_together_without_centres():
    """SupCon on P x K batches of overlapping characters: the loss falls, and each picture's nearest other picture is
    of its own character far more often than in the raw features, where pose-like nuisance dimensions dominate; it
    keeps no per-character centres."""
    from anime_role_detect.data.samplers import PKSampler
    from anime_role_detect.models.metric import supcon_loss

    torch.manual_seed(0)
    centres = torch.randn(6, 8)
    y = torch.arange(6).repeat_interleave(40)
    feats = torch.cat([centres[y] + 0.5 * torch.randn(len(y), 8), 3.0 * torch.randn(len(y), 24)], dim=1)
    head = IdentityHead(32, 6, EmbeddingSpec(dim=16, loss="supcon", temperature=0.1))
    assert head.centres is None and sum(p.numel() for p in head.parameters()) == 32 * 16 + 16
    sampler = PKSampler(y.tolist(), batch_size=24, per_class=4, seed=0)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        order = torch.tensor(list(sampler)).view(-1, sampler.batch_size)
        for idx in order:
            opt.zero_grad()
            loss_value = head.loss(head(feats[idx]), y[idx])
            loss_value.backward()
            opt.step()
            losses.append(float(loss_value.detach()))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])

    def nn1(x: torch.Tensor) -> float:
        x = torch.nn.functional.normalize(x, dim=1)
        sim = (x @ x.t()).fill_diagonal_(-2)
        return float((y[sim.argmax(1)] == y).float().mean())

    with torch.no_grad():
        assert nn1(head(feats)) > nn1(feats) + 0.1
    assert float(supcon_loss(torch.nn.functional.normalize(torch.randn(3, 4), dim=1), torch.tensor([0, 1, 2]), 0.1)) == 0.0
    with pytest.raises(ValueError, match="no per-character centres"):
        head.cosines(head(feats[:2]))


def test_classifier_with_identity_head_gives_its_embedding_to_the_gallery(tmp_path):
    """`embed` and `outputs` give the unit identity embedding (size `embedding.dim`); the heads still read pooled
    features; the checkpoint reloads it and `ClassifierEmbedder` searches it with the same id rules as before."""
    import lightning as L

    from anime_role_detect.recognition.embedder import ClassifierEmbedder

    model = CharacterClassifier(["a", "b", "c"], ["red_hair", "blue_eyes"], backbone=TINY, image_size=32, embedding={"dim": 24})
    x = torch.randn(5, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        emb, logits, tags = model.outputs(x)
        assert emb.shape == (5, 24) and model.embed_dim == 24 and model.feature_dim == model.backbone.num_features
        assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
        assert torch.allclose(emb, model.embed(x)) and torch.allclose(logits, model(x)[0]) and tags.shape == (5, 2)
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    e = ClassifierEmbedder(str(ckpt), device="cpu", flip_tta=False)
    assert e.dim == 24 and e.model.hparams.embedding["dim"] == 24
    from PIL import Image

    images = [Image.new("RGB", (40, 30), (40 * i, 90, 200 - 30 * i)) for i in range(3)]
    vecs, probs, _ = e.embed_with_heads(images)
    assert vecs.shape == (3, 24) and probs.shape == (3, 3)
    assert abs(float((vecs * e.embed(images)).sum(1).min()) - 1.0) < 1e-5


def test_warm_start_keeps_the_centres_of_known_characters(tmp_path):
    import lightning as L

    old = CharacterClassifier(["a", "b"], backbone=TINY, image_size=32, embedding={"dim": 8, "subcenters": 2})
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(old)
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    new = CharacterClassifier(["b", "z", "a"], backbone=TINY, image_size=32, embedding={"dim": 8, "subcenters": 2},
                              init_from=str(tmp_path / "old.ckpt"))
    assert torch.equal(new.identity.centres[4:6], old.identity.centres[0:2])  # a: old rows 0-1 -> new rows 4-5
    assert torch.equal(new.identity.centres[0:2], old.identity.centres[2:4])  # b
    assert torch.equal(new.identity.project.weight, old.identity.project.weight)


def test_bad_embedding_config_is_a_one_line_error():
    with pytest.raises(ConfigError, match="model.embedding.loss"):
        CharacterClassifier(["a", "b"], backbone=TINY, embedding={"dim": 8, "loss": "triplet"})
    with pytest.raises(ConfigError, match="unknown key"):
        CharacterClassifier(["a", "b"], backbone=TINY, embedding={"dim": 8, "margn": 0.3})
    with pytest.raises(ConfigError, match="temperature > 0"):
        CharacterClassifier(["a", "b"], backbone=TINY, embedding={"dim": 8, "loss": "supcon", "temperature": 0})
