"""The workflow on a DDP trainer (`train.overrides=[trainer=ddp, ...]`): Lightning's launcher re-runs the command line
for every other rank, so training runs in a process of its own (`training.launch`) and the workflow runs once.

Two CPU ranks over gloo, Lite0 at 64 px; each workflow run takes ~20 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_TRAIN, workflow_config

from anime_role_detect.registry import Registry
from anime_role_detect.training.launch import STOP_GRACE_S, STOPPED_EXIT
from anime_role_detect.workflow.progress import CancelledError, Progress
from anime_role_detect.workflow.run import run_workflow

pytestmark = pytest.mark.slow  # every test trains in processes of its own

DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.image_size=64", "data.batch_size=8"]


@pytest.fixture(scope="module")
def local_set(tmp_path_factory) -> Path:
    from anime_role_detect.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("ddp_set") / "chars"
    generate_dataset(root, n_characters=3, images_per_character=14, size=96, seed=5, twin_fraction=0.0)
    return root


def _cfg(root: Path, data: Path, run_name: str, epochs: int):
    chars = [{"name": p.name} for p in sorted(data.iterdir()) if p.is_dir()]
    cfg = workflow_config(root, None, chars, ["collector=local", f"collector.root={data}", f"run_name={run_name}"])
    cfg.train.overrides = [*TINY_TRAIN, *DDP, f"trainer.max_epochs={epochs}"]
    return cfg


def test_a_ddp_trainer_trains_on_two_ranks_and_the_workflow_runs_once(tmp_path, local_set, capsys, processes_naming):
    events = []
    progress = Progress(log=False)
    progress.subscribe(lambda ev: events.append((ev.stage, ev.done, ev.total)) if ev.stage == "train" else None)
    result = run_workflow(_cfg(tmp_path, local_set, "ddp", epochs=2), progress)
    err = capsys.readouterr().err
    assert "MEMBER: 1/2" in err and "MEMBER: 2/2" in err  # both ranks joined (their log reaches our stderr)
    assert ("train", 2, 2) in events  # each epoch came back from the child
    assert Registry(tmp_path / "outputs" / "registry").latest_id() == result.version_id
    train_dir = Path(result.run_dir) / "train"
    assert (train_dir / "launch.yaml").is_file() and (train_dir / "checkpoints" / "last.ckpt").is_file()
    assert not processes_naming(str(train_dir / "launch.yaml"))


def test_cancelling_ddp_training_ends_every_rank_and_keeps_the_last_epoch(tmp_path, local_set, capsys,
                                                                          processes_naming):
    progress = Progress(log=False)
    progress.subscribe(lambda ev: progress.cancel() if ev.stage == "train" and ev.done >= 1 else None)
    with pytest.raises(CancelledError):
        run_workflow(_cfg(tmp_path, local_set, "cancel", epochs=20), progress)
    err = capsys.readouterr().err
    assert "training stopped on SIGTERM" in err, err[-3000:]  # both ranks at the same step (StopTogether) ...
    assert "did not stop within" not in err  # ... not SIGKILLed after the grace
    train_dir = tmp_path / "outputs" / "workflow" / "work" / "cancel" / "train"
    assert not processes_naming(str(train_dir / "launch.yaml")), "a rank outlived the cancel"
    assert (train_dir / "checkpoints" / "last.ckpt").is_file()
    assert Registry(tmp_path / "outputs" / "registry").latest_id() is None


def test_a_killed_workflow_leaves_no_rank_behind_and_keeps_the_last_epoch(tmp_path, local_set, processes_naming):
    """Two ranks Lightning started on this machine: both end soon after the workflow is SIGKILLed, and the last
    finished epoch's checkpoint stays for the next attempt (which resumes: the two-node test below runs it)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    chars = json.dumps([{"name": p.name} for p in sorted(local_set.iterdir()) if p.is_dir()])
    args = [sys.executable, "-m", "anime_role_detect.workflow", f"paths.root_dir={tmp_path}", "collector=local",
            f"collector.root={local_set}", "clean.min_side=48", "gallery.embedder.flip_tta=false", "run_name=killed",
            f"characters={chars}", f"train.overrides={json.dumps([*TINY_TRAIN, *DDP, 'trainer.max_epochs=4'])}",
            "log.console_level=WARNING"]
    train_dir = tmp_path / "outputs" / "workflow" / "work" / "killed" / "train"
    events = train_dir / "launch-events.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (events.is_file() and '"done": 1' in events.read_text()):  # epoch 1 and its last.ckpt are saved
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "training never finished an epoch"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 60  # the child looks for its caller once a second, then stops (~3 s)
    while (left := processes_naming(str(train_dir / "launch.yaml"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "a training rank outlived its killed workflow"
    done = [json.loads(line)["done"] for line in events.read_text().splitlines()]
    assert max(done) < 4, f"training ran on to its end after its workflow was killed: {done}"
    assert (train_dir / "checkpoints" / "last.ckpt").is_file()
    assert Registry(tmp_path / "outputs" / "registry").latest_id() is None


def test_a_second_node_joins_with_the_saved_command_and_a_killed_workflow_stops_both_nodes(
        tmp_path, local_set, processes_naming):
    """`trainer.num_nodes=2`: the workflow's machine is node 0, and another node joins by running the command the
    workflow saved, `python -m anime_role_detect.cli.train_config <run>/train/launch.yaml`, with NODE_RANK=1 and the
    same MASTER_ADDR/MASTER_PORT (here two "nodes" of one CPU rank each, gloo on loopback). SIGKILL the workflow and
    both nodes stop (no rank waits out torch's 30-minute collective timeout); run both commands again and training
    resumes to a live version."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0"}
    chars = json.dumps([{"name": p.name} for p in sorted(local_set.iterdir()) if p.is_dir()])
    nodes = ["trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=4"]
    overrides = [o for o in [*TINY_TRAIN, *DDP] if not o.startswith(("trainer.devices=", "trainer.max_epochs="))] + nodes
    workflow = [sys.executable, "-m", "anime_role_detect.workflow", f"paths.root_dir={tmp_path}", "collector=local",
                f"collector.root={local_set}", "clean.min_side=48", "gallery.embedder.flip_tta=false", "run_name=nodes",
                f"characters={chars}", f"train.overrides={json.dumps(overrides)}", "log.console_level=WARNING"]
    launch = tmp_path / "outputs" / "workflow" / "work" / "nodes" / "train" / "launch.yaml"
    events = launch.parent / "launch-events.jsonl"

    started: list[subprocess.Popen] = []

    def start_both(log: str, older_than: int) -> tuple[subprocess.Popen, subprocess.Popen]:
        with open(tmp_path / f"{log}-node0.log", "w") as out:
            node0 = subprocess.Popen(workflow, env=env, stdout=out, stderr=subprocess.STDOUT)
        started.append(node0)
        deadline = time.monotonic() + 240  # node 1 joins once this run has written its launch.yaml
        while not (launch.is_file() and launch.stat().st_mtime_ns > older_than):
            assert node0.poll() is None and time.monotonic() < deadline, (tmp_path / f"{log}-node0.log").read_text()[-3000:]
            time.sleep(0.1)
        with open(tmp_path / f"{log}-node1.log", "w") as out:
            node1 = subprocess.Popen([sys.executable, "-m", "anime_role_detect.cli.train_config", str(launch)],
                                     env={**env, "NODE_RANK": "1"}, stdout=out, stderr=subprocess.STDOUT)
        started.append(node1)
        return node0, node1

    try:
        _kill_and_resume_on_two_nodes(tmp_path, start_both, launch, events, processes_naming)
    finally:
        for proc in started:  # a failed assertion leaves no process behind
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        for pid in processes_naming(str(launch)):  # nor a training rank of node 0 (a session of its own)
            os.kill(pid, 9)


def _kill_and_resume_on_two_nodes(tmp_path: Path, start_both, launch: Path, events: Path, processes_naming) -> None:
    import json
    import signal
    import time

    node0, node1 = start_both("first", older_than=0)
    deadline = time.monotonic() + 240
    while not (events.is_file() and '"done": 1' in events.read_text()):  # epoch 1 trained on both nodes and saved
        assert node0.poll() is None and node1.poll() is None, (tmp_path / "first-node1.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "training never finished an epoch"
        time.sleep(0.1)
    node0.send_signal(signal.SIGKILL)
    node0.wait(30)
    # node 0's rank, its caller gone, sends itself SIGTERM; StopTogether stops every rank after the same batch and
    # each exits STOPPED_EXIT (not 0 from Lightning's SIGTERM path, nor 1 from a connection closed by a SIGKILL)
    assert node1.wait(STOP_GRACE_S + 30) == STOPPED_EXIT, (tmp_path / "first-node1.log").read_text()[-3000:]
    deadline = time.monotonic() + STOP_GRACE_S + 10
    while processes_naming(str(launch)):  # node 0's rank may still be leaving as node 1 exits
        assert time.monotonic() < deadline, "a rank of node 0 outlived its killed workflow"
        time.sleep(0.1)
    assert max(json.loads(line)["done"] for line in events.read_text().splitlines()) < 4

    node0, node1 = start_both("again", older_than=launch.stat().st_mtime_ns)
    assert node0.wait(300) == 0, (tmp_path / "again-node0.log").read_text()[-3000:]
    assert node1.wait(60) == 0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in (tmp_path / "again-node1.log").read_text()
    stage = json.loads((launch.parent.parent / "stages" / "train.json").read_text())
    assert stage["output"]["resumed_from"].endswith("last.ckpt")
    assert Registry(tmp_path / "outputs" / "registry").latest_id()


def test_a_user_error_in_the_training_child_stays_one_line(tmp_path):
    from anime_role_detect.confutil import compose_config
    from anime_role_detect.errors import UserError
    from anime_role_detect.training import train_launched

    cfg = compose_config("train", [*TINY_TRAIN, *DDP, f"data.root={tmp_path / 'missing'}", f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError) as err:
        train_launched(cfg)
    assert str(tmp_path / "missing") in str(err.value) and "\n" not in str(err.value)


def test_train_config_refuses_a_file_that_is_not_a_saved_config_in_one_line(tmp_path):
    import subprocess
    import sys

    for name, text in (("list.yaml", "- a\n- b\n"), ("broken.yaml", "a: [\n")):
        (tmp_path / name).write_text(text)
        p = subprocess.run([sys.executable, "-m", "anime_role_detect.cli.train_config", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [
            f"error: {tmp_path / name} is not a saved training config "
            f"({'no trainer section' if name == 'list.yaml' else 'ParserError'}); give the launch.yaml a training run folder holds"]


def test_the_training_command_run_by_hand_outlives_its_shell(tmp_path, local_set, processes_naming):
    """Another node's command, started by hand (``nohup ... &`` and the shell gone), trains to its end: only the
    workflow's own child (``--parent-pid``) stops when the process that started it is gone."""
    import subprocess
    import sys
    import time

    from omegaconf import OmegaConf

    from anime_role_detect.confutil import compose_config

    cfg = compose_config("train", [*TINY_TRAIN, f"data.root={local_set}", f"paths.output_dir={tmp_path / 'run'}",
                                   "trainer.max_epochs=2"])
    launch = tmp_path / "launch.yaml"
    launch.write_text(OmegaConf.to_yaml(cfg))
    result = tmp_path / "result.json"
    cmd = f"{sys.executable} -m anime_role_detect.cli.train_config {launch} --result {result} >{tmp_path / 'log'} 2>&1 &"
    subprocess.run(["sh", "-c", cmd + " sleep 5"], check=True, timeout=30)  # the shell goes once the command runs
    deadline = time.monotonic() + 240
    while not result.is_file():
        time.sleep(0.5)
        gone = not processes_naming(str(launch)) and not result.is_file()
        assert not gone and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
