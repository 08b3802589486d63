"""Checkpoints users can trust: nothing unpickled, one writer, durable publish, paths checked first,
lineage, async publish, NaN stops under restarts, disk full, fallback."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k2train.config.load import load_config
from k2train.data.prepare import prepare_dataset
from k2train.model import K2Model
from k2train.train.loop import NonFiniteLossError
from multiproc import run_world
from parallel.checkpoint.checkpointer import MANIFEST, CheckpointError, Checkpointer, file_digest
from parallel.checkpoint.lock import CheckpointLock, CheckpointLockError
from parallel.checkpoint.metadata import METADATA_JSON
from parallel.preflight import PathError
from parallel.trainer import run_training
from launch.env import launch_env

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "k2_tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data") / "sources"
    prepare_dataset(sorted((ROOT / "k2train" / "config").rglob("*.py")), out, "byte")
    return str(out)


def tiny(tmp: Path, corpus: str, *overrides: str, name: str = "run"):
    base = [f"data.prefix={corpus}", f"logging.run_root={tmp / 'runs'}", f"logging.run_name={name}",
            "logging.wandb=false", "logging.plots=false", "logging.progress_bar=false",
            "train.global_batch_tokens=512", "train.micro_batch_size=4", "parallel.pp=1", "parallel.vp=1",
            "parallel.ep=1", "parallel.dp=1", f"checkpoint.dir={tmp / 'ckpt'}", "checkpoint.every_steps=1"]
    return load_config(TINY, [*base, *overrides])


def small_checkpointer(tmp: Path, *overrides: str) -> Checkpointer:
    cfg = load_config(TINY, ["parallel.pp=1", "parallel.vp=1", "parallel.ep=1", *overrides])
    return Checkpointer(cfg, tmp / "ckpt", rank=0, distributed=False)


class Exploit:
    """What a crafted `.metadata` holds: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_metadata_runs_nothing_and_is_refused_by_name(tmp_path):
    ck = small_checkpointer(tmp_path)
    ck.save(1, {"model/x": torch.arange(4.0)}, {}, {"world_size": 1})
    step = tmp_path / "ckpt" / "step_00000001"
    marker = tmp_path / "code-ran"
    (step / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"][".metadata"] = file_digest(step / ".metadata")  # whoever writes one writes both
    (step / MANIFEST).write_text(json.dumps(manifest))
    out = {"model/x": torch.zeros(4)}
    small_checkpointer(tmp_path).load(step, out)
    assert torch.equal(out["model/x"], torch.arange(4.0)) and not marker.exists()
    # Without the JSON index only the pickle is left: refused, naming both files; nothing runs.
    (step / METADATA_JSON).unlink()
    del manifest["files"][METADATA_JSON]
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"{METADATA_JSON} is missing.*pickle .*\.metadata.*--trust-checkpoint"):
        small_checkpointer(tmp_path).load(step, out)
    assert not marker.exists()


def test_trust_checkpoint_reads_a_checkpoint_that_has_only_the_pickled_index(tmp_path):
    small_checkpointer(tmp_path).save(1, {"model/x": torch.arange(4.0)}, {}, {"world_size": 1})
    step = tmp_path / "ckpt" / "step_00000001"
    (step / METADATA_JSON).unlink()
    manifest = json.loads((step / MANIFEST).read_text())
    del manifest["files"][METADATA_JSON]
    (step / MANIFEST).write_text(json.dumps(manifest))
    out = {"model/x": torch.zeros(4)}
    small_checkpointer(tmp_path, "checkpoint.trust_pickle_metadata=true").load(step, out)
    assert torch.equal(out["model/x"], torch.arange(4.0))


def test_a_json_index_pointing_outside_the_checkpoint_is_refused(tmp_path):
    ck = small_checkpointer(tmp_path)
    ck.save(1, {"model/x": torch.arange(4.0)}, {}, {"world_size": 1})
    step = tmp_path / "ckpt" / "step_00000001"
    index = json.loads((step / METADATA_JSON).read_text())
    index["storage"][0]["file"] = "../../etc/passwd"
    (step / METADATA_JSON).write_text(json.dumps(index))
    (step / MANIFEST).write_text(json.dumps({**json.loads((step / MANIFEST).read_text()), "files": {}}))
    with pytest.raises(CheckpointError, match=r"not a k2train DCP index .*not a __<rank>_<n>\.distcp file"):
        small_checkpointer(tmp_path).load(step, {"model/x": torch.zeros(4)})


def resave_and_die(payload: dict) -> None:
    """Save step 1, then re-save it and die (like SIGKILL) at the named point of the publish."""
    import parallel.checkpoint.checkpointer as checkpoint

    ck = small_checkpointer(Path(payload["tmp"]))
    ck.save(1, {"model/x": torch.zeros(4)}, {}, {"world_size": 1})
    point_latest, rmtree = checkpoint.point_latest, checkpoint.shutil.rmtree

    def die_before_pointer(root, name):
        os._exit(9)

    def die_before_removal(path, *args, **kwargs):
        os._exit(9)

    if payload["at"] == "before-pointer":
        checkpoint.point_latest = die_before_pointer
    else:
        checkpoint.point_latest = lambda root, name: (point_latest(root, name), setattr(checkpoint.shutil, "rmtree", die_before_removal))
    ck.save(1, {"model/x": torch.ones(4)}, {}, {"world_size": 1})
    checkpoint.shutil.rmtree = rmtree


@pytest.mark.parametrize("at,value", [("before-pointer", 0.0), ("before-removal", 1.0)])
def test_a_kill_inside_the_resave_window_keeps_a_complete_latest(tmp_path, at, value):
    with pytest.raises(RuntimeError, match="failed"):
        run_world(1, "test_checkpoint_trust:resave_and_die", dict(tmp=str(tmp_path), at=at))
    root = tmp_path / "ckpt"
    copies = sorted(p.name for p in root.glob("step_00000001*"))
    assert len(copies) == 2 and copies[0] == "step_00000001" and copies[1].startswith("step_00000001.r")
    out = {"model/x": torch.full((4,), -1.0)}
    from parallel.checkpoint.checkpointer import latest_checkpoint
    small_checkpointer(tmp_path).load(latest_checkpoint(root), out)
    assert torch.equal(out["model/x"], torch.full((4,), value))
    assert not (root / "latest").is_symlink() and "/" not in (root / "latest").read_text()


def test_a_second_writer_is_refused_by_name_and_a_gone_one_is_taken_over(tmp_path, corpus):
    root = tmp_path / "ckpt"
    root.mkdir()
    live = CheckpointLock(root, take_over=False)
    live.acquire()  # this test process: alive on this host
    with pytest.raises(CheckpointLockError, match=rf"in use by run {live.owner.run_id} \(pid {os.getpid()} on host"):
        run_training(tiny(tmp_path, corpus, "train.steps=1"), launch_env())
    assert not (tmp_path / "runs" / "run").exists()  # refused before step 1
    foreign = root / f"step_00000009.partial-{live.owner.run_id}-0000abcd"
    foreign.mkdir()
    run_training(tiny(tmp_path, corpus, "train.steps=1", "checkpoint.take_over=true", name="forced"), launch_env())
    assert foreign.is_dir()  # only the owner cleans its own partial directories
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (root / "k2train.lock").write_text(json.dumps(dict(host=live.owner.host, pid=int(gone.stdout), launch="",
                                                       run_id="deadbeef", since="then")))
    (root / "step_00000009.partial-deadbeef-0000abcd").mkdir()
    run_training(tiny(tmp_path, corpus, "train.steps=2", name="after-dead"), launch_env())
    assert not (root / "step_00000009.partial-deadbeef-0000abcd").exists()
    assert not (root / "k2train.lock").exists()  # released at the end


def test_unusable_paths_and_malformed_json_are_named_before_step_1(tmp_path, corpus, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PathError, match=rf"checkpoint directory \(checkpoint.dir\) {blocker} .*{blocker} is a file"):
        run_training(tiny(tmp_path, corpus, f"checkpoint.dir={blocker}"), launch_env())
    with pytest.raises(PathError, match=r"run root \(logging.run_root\)"):
        run_training(tiny(tmp_path, corpus, f"logging.run_root={blocker / 'runs'}"), launch_env())
    monkeypatch.setenv("K2TRAIN_CACHE", str(blocker))
    with pytest.raises(PathError, match=r"data cache \(\$K2TRAIN_CACHE"):
        run_training(tiny(tmp_path, corpus, "data.prefix="), launch_env())
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)], check=True)
    try:
        with pytest.raises(PathError, match=rf"{readonly / 'ckpt'} is not writable \(Read-only file system\)"):
            run_training(tiny(tmp_path, corpus, f"checkpoint.dir={readonly / 'ckpt'}"), launch_env())
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert not (tmp_path / "runs" / "run").exists()
    run_training(tiny(tmp_path, corpus, "train.steps=1"), launch_env())
    (tmp_path / "ckpt" / "step_00000001" / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'ckpt' / 'step_00000001' / MANIFEST} is not valid JSON"):
        run_training(tiny(tmp_path, corpus, "train.steps=2", name="again"), launch_env())


def test_a_changed_config_resumes_only_when_asked_and_steps_must_grow(tmp_path, corpus):
    run_training(tiny(tmp_path, corpus, "train.steps=1"), launch_env())
    with pytest.raises(CheckpointError, match=r"belongs to run \w+, saved under another config: optimizer.lr: 0.01 -> 0.001"):
        run_training(tiny(tmp_path, corpus, "train.steps=2", "optimizer.lr=1e-3", name="sweep"), launch_env())
    with pytest.raises(CheckpointError, match=r"already at step 1, and train.steps is 1"):
        run_training(tiny(tmp_path, corpus, "train.steps=1", name="same"), launch_env())
    run_training(tiny(tmp_path, corpus, "train.steps=2", "optimizer.lr=1e-3", "checkpoint.resume=changed", name="ok"),
                 launch_env())
    manifest = json.loads((tmp_path / "ckpt" / "step_00000002" / MANIFEST).read_text())
    first = json.loads((tmp_path / "ckpt" / "step_00000001" / MANIFEST).read_text())
    assert manifest["lineage"]["run_id"] == first["lineage"]["run_id"]
    assert manifest["lineage"]["config"]["optimizer.lr"] == 1e-3


def test_a_missing_latest_over_existing_steps_is_an_error(tmp_path, corpus):
    run_training(tiny(tmp_path, corpus, "train.steps=2"), launch_env())
    (tmp_path / "ckpt" / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"holds step_00000001, step_00000002 but no `latest` pointer"):
        run_training(tiny(tmp_path, corpus, "train.steps=3", name="again"), launch_env())


def test_convert_writes_only_into_an_empty_or_new_directory(tmp_path, capsys):
    from launch.cli import main

    used = tmp_path / "used"
    used.mkdir()
    (used / "latest").write_text("step_00000004")
    assert main(["convert", "--config", str(TINY), "--from-hf", str(tmp_path), "--out", str(used)]) == 2
    assert f"--out {used} is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in used.iterdir()) == ["latest"]


def test_an_async_save_is_published_as_soon_as_its_files_are_complete(tmp_path):
    ck = small_checkpointer(tmp_path, "checkpoint.async_save=true")
    ck.save(5, {"model/x": torch.arange(4.0)}, {}, {"world_size": 1})
    ck.pending[0].result()  # the files are written; no further save comes
    ck.poll()  # what the runner calls after every step
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000005"
    assert not list((tmp_path / "ckpt").glob("*.partial-*"))


def _poison(monkeypatch, from_step: int, micro_batches: int = 2) -> None:
    calls = {"n": 0}
    forward = K2Model.forward

    def poisoned(self, tokens):
        calls["n"] += 1
        out = forward(self, tokens)
        if (calls["n"] - 1) // micro_batches + 1 >= from_step:
            out.output = out.output * float("nan")
        return out

    monkeypatch.setattr(K2Model, "forward", poisoned)


def test_a_nan_stop_is_final_under_restarts_and_skips_are_bounded(tmp_path, corpus, monkeypatch):
    _poison(monkeypatch, 3)
    with pytest.raises(NonFiniteLossError) as first:
        run_training(tiny(tmp_path, corpus, "train.steps=5"), launch_env())
    monkeypatch.undo()  # the relaunch is healthy, but the stop stands, with the same sentence
    with pytest.raises(NonFiniteLossError) as again:
        run_training(tiny(tmp_path, corpus, "train.steps=5", name="relaunch"), launch_env())
    assert str(again.value).startswith(str(first.value)) and "k2train-stopped.json" in str(again.value)
    assert not (tmp_path / "runs" / "relaunch").exists()
    _poison(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError, match=r"Stopped at step 4: .* 3 steps in a row, more than "
                                                 r"train.max_skipped_steps=2; 2 steps were skipped in all"):
        run_training(tiny(tmp_path, corpus, "train.steps=6", "train.on_nonfinite=skip", "train.max_skipped_steps=2",
                          f"checkpoint.dir={tmp_path / 'skip'}", name="skip"), launch_env())


def test_disk_full_is_named_and_its_partial_directory_removed(tmp_path, corpus):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(CheckpointError, match=r"no space left on the device holding .*partial directory was removed"):
            run_training(tiny(tmp_path, corpus, "train.steps=1", f"checkpoint.dir={small / 'ckpt'}"), launch_env())
        assert not list((small / "ckpt").glob("step_*"))
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_unreadable_newest_checkpoint_names_the_intact_one_and_falls_back_only_when_asked(tmp_path, corpus):
    run_training(tiny(tmp_path, corpus, "train.steps=2"), launch_env())
    shard = next((tmp_path / "ckpt" / "step_00000002").glob("*.distcp"))
    shard.write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=r"does not match its sha256 .* newest intact checkpoint is "
                                              r".*step_00000001; resume from it with --set checkpoint.fallback=true"):
        run_training(tiny(tmp_path, corpus, "train.steps=3", name="stop"), launch_env())
    run_training(tiny(tmp_path, corpus, "train.steps=3", "checkpoint.fallback=true", name="fallback"), launch_env())
    lines = (tmp_path / "runs" / "fallback" / "metrics.jsonl").read_text().splitlines()[1:]
    assert [json.loads(line)["step"] for line in lines] == [2, 3]


def signalled_job(payload: dict) -> str:
    """One rank of a run; with `signal_at`, rank 1 alone receives SIGTERM during that step."""
    import signal

    import torch.distributed as dist

    from parallel.runner import ParallelRunner
    from parallel.signals import JobStopped

    end_of_step = ParallelRunner.end_of_step

    def signalled(self, step, last):
        if step == payload.get("signal_at") and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return end_of_step(self, step, last)

    ParallelRunner.end_of_step = signalled
    try:
        run_training(tiny(Path(payload["tmp"]), payload["corpus"], *payload["overrides"], name=payload["name"]),
                     launch_env())
    except JobStopped as err:
        return f"{err} (exit {err.exit_code})"
    return "finished"


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint_and_resumes_bit_for_bit(tmp_path, corpus):
    from test_checkpoint import model_tensors

    def job(name, steps, ckpt, **extra):
        overrides = ["parallel.ep=2", "parallel.dp=1", f"train.steps={steps}", "checkpoint.every_steps=3",
                     f"checkpoint.dir={tmp_path / ckpt}"]
        return run_world(2, "test_checkpoint_trust:signalled_job",
                         dict(tmp=str(tmp_path), corpus=corpus, overrides=overrides, name=name, **extra))

    assert job("whole", 4, "c-whole") == ["finished"] * 2
    stopped = job("first", 4, "c-split", signal_at=2)
    assert stopped[0] == stopped[1]
    assert stopped[0].startswith("stopped by SIGTERM after step 2 of 4; its checkpoint is in") and "(exit 143)" in stopped[0]
    assert (tmp_path / "c-split" / "latest").read_text() == "step_00000002"
    assert job("second", 4, "c-split") == ["finished"] * 2
    a = model_tensors(tmp_path / "c-whole" / "step_00000004", tmp_path)
    b = model_tensors(tmp_path / "c-split" / "step_00000004", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_forwarded_copy_of_the_signal_is_one_request_and_a_later_one_interrupts():
    """Slurm signals every process and torchrun forwards the signal: a worker gets two at once."""
    import signal

    from parallel.signals import REPEAT_WINDOW_S, StopSignals

    now = [100.0]
    stops = StopSignals(torch.device("cpu"), distributed=False, clock=lambda: now[0])
    stops._handle(signal.SIGTERM, None)
    now[0] += 0.2
    stops._handle(signal.SIGTERM, None)  # the launcher's copy: still one clean stop
    assert stops.agreed() == signal.SIGTERM
    now[0] += REPEAT_WINDOW_S
    with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
        stops._handle(signal.SIGTERM, None)
