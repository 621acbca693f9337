"""Stage bookkeeping: the same command finds the same run folder, a changed setting redoes only its stage and later ones."""

from __future__ import annotations

import pytest
from conftest import workflow_config
from hydra import compose, initialize_config_dir

from anime_role_detect.errors import UserError
from anime_role_detect.workflow.progress import Progress
from anime_role_detect.confutil import CONFIG_DIR
from anime_role_detect.workflow.run import hydra_quote, parse_characters, resolve_run_dir, run_lock, run_workflow


def _chars(specs) -> list[dict]:
    return [{"name": s.name, "series": s.series} for s in specs]


def test_same_command_same_run_folder_and_caps_do_not_move_it(tmp_path, specs):
    a = workflow_config(tmp_path, "http://127.0.0.1:1", _chars(specs))
    b = workflow_config(tmp_path, "http://127.0.0.1:1", _chars(specs), ["collector.limit_per_character=999"])
    c = workflow_config(tmp_path, "http://127.0.0.1:1", _chars(specs[:2]))
    run_a = resolve_run_dir(a, parse_characters(a))
    assert run_a == resolve_run_dir(b, parse_characters(b))  # raising a cap reuses the downloads
    assert run_a != resolve_run_dir(c, parse_characters(c))
    assert run_a.name.startswith(f"{specs[0].name}+2-")


def test_changed_clean_setting_redoes_clean_and_later_stages_only(tmp_path, booru, specs):
    cfg = workflow_config(tmp_path, booru.base_url, _chars(specs), ["stop_after=split", "clean.near_duplicates=remove"])
    first = run_workflow(cfg, Progress(log=False))
    assert first.resumed_stages == []
    requests = dict(booru.image_requests)
    cfg2 = workflow_config(tmp_path, booru.base_url, _chars(specs), ["stop_after=split", "clean.near_duplicates=group"])
    second = run_workflow(cfg2, Progress(log=False))
    assert second.resumed_stages == ["collect"] and second.run_dir == first.run_dir
    assert dict(booru.image_requests) == requests
    kept_first = {r["character"]: r["kept"] for r in first.summary}
    kept_second = {r["character"]: r["kept"] for r in second.summary}
    assert all(kept_second[c] > kept_first[c] for c in kept_first)  # grouped copies are kept
    third = run_workflow(cfg2, Progress(log=False))
    assert third.resumed_stages == ["collect", "clean", "split"]


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(UserError, match="another workflow is running"):
            with run_lock(tmp_path):
                pass


def test_hydra_quote_survives_spaces_quotes_commas_and_interpolations(tmp_path):
    odd = str(tmp_path / "my data, it's [v2]" / "${not_a_key}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=folder", f"data.root={hydra_quote(odd)}"])
    assert cfg.data.root == odd


def test_collector_choices_compose(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        safe = compose(config_name="workflow", overrides=["collector=safebooru"])
        local = compose(config_name="workflow", overrides=["collector=local", f"collector.root={tmp_path}"])
    assert safe.collector.base_url == "https://safebooru.org" and safe.collector.name == "gelbooru"
    assert local.collector.name == "local"


def test_json_list_overrides_become_hydra_overrides():
    from anime_role_detect.workflow.__main__ import json_overrides_to_hydra

    args = json_overrides_to_hydra([
        'characters=[{"name": "Hoshino", "series": "Blue Archive"}, {"name": "Rem", "tag": "rem_(re:zero)", "limit": 5}]',
        'extra_datasets=["/data/it\'s here, [v2]"]', "train.overrides=[\"data=folder\",\"~experiment\"]", "run_name=x",
        "characters_hydra=[a,b]",
    ])
    assert args[3:] == ["run_name=x", "characters_hydra=[a,b]"]  # not JSON: untouched
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="workflow", overrides=args[:3])
    assert [dict(c) for c in cfg.characters] == [{"name": "Hoshino", "series": "Blue Archive"},
                                                 {"name": "Rem", "tag": "rem_(re:zero)", "limit": 5}]
    assert list(cfg.extra_datasets) == ["/data/it's here, [v2]"] and list(cfg.train.overrides) == ["data=folder", "~experiment"]


def local_run_context(tmp_path, *overrides, schedule_free: bool = False):
    """A local-collector workflow config and its run context, as the training bridge sees them; `schedule_free` puts
    conf/workflow.yaml's `train.overrides` back in place of the tests' tiny training (which sets the epochs), so the
    face view's schedule applies."""
    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.workflow.context import RunContext

    cfg = workflow_config(tmp_path, None, [{"name": "a"}], ["collector=local", f"collector.root={tmp_path}", *overrides])
    if schedule_free:
        cfg.train.overrides = list(compose_plain("workflow")["train"]["overrides"])
    return cfg, RunContext(cfg=cfg, progress=Progress(), run_dir=tmp_path / "run", queries=[])


@pytest.mark.parametrize("on, kind, margin", [(False, "animeface", 0.1), (True, "animeface", 0.1), ("head", "region", 0.0)])
def test_workflow_face_view_reaches_the_training_config(tmp_path, on, kind, margin):
    """`train.face_view` (the workflow's one switch for face + figure views) sets ``data.face_view``: off, animeface
    faces, or the head view (detector `region`, no animeface options carried along); anything else is one line."""
    from anime_role_detect.errors import ConfigError
    from anime_role_detect.workflow.training_bridge import compose_train_config

    cfg, ctx = local_run_context(tmp_path, f"train.face_view={on}")
    tcfg = compose_train_config(ctx, None)
    assert tcfg.data.face_view.enabled is bool(on) and tcfg.data.face_view.margin == margin
    assert tcfg.data.face_view.detector.kind == kind and (kind == "animeface" or set(tcfg.data.face_view.detector) == {"kind"})
    cfg.train.face_view = "faces"
    with pytest.raises(ConfigError, match="train.face_view='faces' is not a choice; use false, true"):
        compose_train_config(ctx, None)


@pytest.mark.parametrize("on, epochs, patience, lr", [(False, 10, 4, 3e-4), (True, 10, 4, 3e-4), ("head", 8, 8, 1e-3)])
def test_each_face_view_trains_on_its_own_schedule_and_train_overrides_win(tmp_path, on, epochs, patience, lr):
    """`train.face_view_overrides`: a head view doubles the samples of an epoch, so it trains 8 epochs (fewer, not below 6,
    where they do not fit its step budget) where figure-only training takes 10, its Lite0 body at lr 1e-3 (measured:
    docs/accuracy.md "Learning rate") and no early stop before its last epoch (docs/accuracy.md "Early stopping"); an epoch
    count or a learning rate in `train.overrides` still wins, and the head schedule's patience follows the epoch count."""
    from anime_role_detect.workflow.training_bridge import compose_train_config

    cfg, ctx = local_run_context(tmp_path, f"train.face_view={on}", schedule_free=True)
    tcfg = compose_train_config(ctx, None)
    assert (tcfg.trainer.max_epochs, tcfg.callbacks.early_stopping.patience) == (epochs, patience)
    assert tcfg.model.optimizer.lr == pytest.approx(lr)
    cfg.train.overrides = [*cfg.train.overrides, "trainer.max_epochs=2", "model.optimizer.lr=5e-4"]
    tcfg = compose_train_config(ctx, None)
    assert tcfg.trainer.max_epochs == 2 and tcfg.model.optimizer.lr == pytest.approx(5e-4)
    assert tcfg.callbacks.early_stopping.patience == (2 if on == "head" else patience)


def test_the_workflow_trains_on_head_views_by_default(tmp_path):
    """With no options the workflow trains (and its versions recognise) on each picture's head view beside its figure,
    the best recipe measured within its training budget (docs/accuracy.md "Head views")."""
    from anime_role_detect.workflow.training_bridge import compose_train_config

    _, ctx = local_run_context(tmp_path, schedule_free=True)
    tcfg = compose_train_config(ctx, None)
    assert tcfg.data.face_view.enabled is True and dict(tcfg.data.face_view.detector) == {"kind": "region"}
    assert tcfg.trainer.max_epochs == 8 and tcfg.model.optimizer.lr == pytest.approx(1e-3)
    assert dict(tcfg.epoch_budget) == {"max_steps": 1200, "min_epochs": 6}  # ~2,000 pictures keep their 30 minutes


def test_a_torn_last_checkpoint_is_set_aside_so_training_starts_over(tmp_path):
    import torch

    from anime_role_detect.workflow.training_bridge import readable_checkpoint

    whole = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}, "epoch": 3}, whole)
    assert readable_checkpoint(whole) and whole.is_file()
    data = whole.read_bytes()
    whole.write_bytes(data[: len(data) // 2])  # what a kill during the save leaves
    assert not readable_checkpoint(whole)
    assert not whole.exists() and (tmp_path / "last.ckpt.torn").stat().st_size == len(data) // 2
