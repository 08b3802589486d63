"""Launching: torchrun's and Slurm's variables, the rendezvous, the sbatch scripts' checks.

The bad launches (a world the layout cannot use, a missing config, a rendezvous nobody answers)
must stop within seconds with a sentence naming the problem. The sbatch scripts run here outside
Slurm with stand-ins for `srun` and `scontrol` that record what they were asked to start; the real
cluster run is `make slurm-test`.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch.env import launch_env
from parallel.state import DEFAULT_RENDEZVOUS_TIMEOUT_S, LaunchEnv, LaunchError, rendezvous_store

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "launch" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))
TINY = "configs/k2_tiny.yaml"
QUIET_RUN = ["--set", "logging.wandb=false", "--set", "logging.plots=false", "--set", "logging.progress_bar=false"]


def _free_port() -> int:
    """A port nothing listens on (bound and released: the kernel will not hand it out again soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the command line: built and helped without torch ---------------------------------------------

COMMANDS = [["train"], ["data", "prepare"], ["layout"], ["optimizer-plan"], ["plan"], ["convert"], ["profile"]]


def test_building_the_command_line_does_not_import_torch() -> None:
    code = ("import sys; from launch.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_every_command_helps_without_torch() -> None:
    code = ("import sys\nfrom launch.cli import main\n"
            f"for argv in {[[], *COMMANDS]!r}:\n"
            "    try:\n        main([*argv, '--help'])\n"
            "    except SystemExit as stop:\n        assert stop.code == 0, (argv, stop.code)\n"
            "    else:\n        raise AssertionError(f'{argv} --help did not exit')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert f"usage: k2train {' '.join(command)} [-h]" in proc.stdout


def test_k2train_help_exits_zero() -> None:
    proc = subprocess.run([sys.executable, "-m", "k2train", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: k2train [-h]")
    assert all(command[0] in proc.stdout for command in COMMANDS)


# ---- launch_env: which variables make the world -------------------------------------------------


def test_torchrun_variables() -> None:
    env = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                      "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert env == LaunchEnv(3, 8, 1, "node7", 29500, DEFAULT_RENDEZVOUS_TIMEOUT_S, "torchrun", agent_store=True)


def test_slurm_variables_inside_a_job_step() -> None:
    env = launch_env({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                      "MASTER_ADDR": "gpu001", "MASTER_PORT": "21234", "K2TRAIN_RENDEZVOUS_TIMEOUT": "2.5"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "Slurm")
    assert (env.master_addr, env.master_port, env.rendezvous_timeout_s, env.agent_store) == ("gpu001", 21234, 2.5, False)


def test_torchrun_inside_a_slurm_step_wins() -> None:
    """Under `srun torchrun`, SLURM_PROCID numbers the node's torchrun; RANK numbers the process."""
    env = launch_env({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                      "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (6, 8, 2, "torchrun")


def test_slurm_batch_script_is_one_process() -> None:
    """The batch script carries SLURM_PROCID=0 and the job's SLURM_NTASKS, but no step: one process."""
    env = launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "one process")


@pytest.mark.parametrize(("environ", "named"), [
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK is 'x'"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "rank 4 of a world of 4"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT is 70000"),
    ({"K2TRAIN_RENDEZVOUS_TIMEOUT": "soon"}, "K2TRAIN_RENDEZVOUS_TIMEOUT is 'soon'"),
    ({"K2TRAIN_RENDEZVOUS_TIMEOUT": "0"}, "K2TRAIN_RENDEZVOUS_TIMEOUT is '0'"),
])
def test_bad_launch_variables_are_named(environ: dict[str, str], named: str) -> None:
    with pytest.raises(LaunchError, match=named):
        launch_env(environ)


# ---- the rendezvous: fails within its timeout, naming the address -------------------------------


def test_rendezvous_needs_master_address() -> None:
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT"):
        rendezvous_store(LaunchEnv(1, 2, 1, launcher="Slurm"))


def test_unreachable_rendezvous_fails_within_its_timeout() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(LaunchError, match=rf"rank 1 of 2 could not reach the rendezvous at 127.0.0.1:{port}"):
        rendezvous_store(LaunchEnv(1, 2, 1, "127.0.0.1", port, 1.0, "Slurm"))
    assert time.monotonic() - start < 10


def test_rank_zero_alone_fails_within_its_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(LaunchError, match="not all 3 ranks arrived within 1 s"):
        rendezvous_store(LaunchEnv(0, 3, 0, "127.0.0.1", _free_port(), 1.0, "Slurm"))
    assert time.monotonic() - start < 10


def test_rendezvous_of_two_ranks_meets() -> None:
    port, stores, errors = _free_port(), {}, []

    def join(rank: int) -> None:
        try:
            stores[rank] = rendezvous_store(LaunchEnv(rank, 2, rank, "127.0.0.1", port, 20.0, "Slurm"))
        except LaunchError as err:
            errors.append(err)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sorted(stores) == [0, 1]
    stores[1].set("from-rank-1", "hello")
    assert stores[0].get("from-rank-1") == b"hello"


# ---- `k2train train` as a launched rank: bad launches stop within seconds ------------------------


def _k2train(args: list[str], extra_env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(extra_env, OMP_NUM_THREADS="1", K2TRAIN_CACHE=str(tmp_path / "cache"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "k2train", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def test_world_the_layout_cannot_use_stops_before_the_rendezvous(tmp_path: Path) -> None:
    slurm = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_LOCALID": "0",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc, seconds = _k2train(["--config", TINY, *QUIET_RUN], slurm, tmp_path)
    assert proc.returncode == 2
    assert "a world of 6 ranks is not a multiple of parallel.pp 2 x parallel.ep 2" in proc.stderr
    assert seconds < 60


def test_missing_config_stops(tmp_path: Path) -> None:
    proc, _ = _k2train(["--config", "configs/no_such.yaml"], {}, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "k2train: error: configs/no_such.yaml: no such config file."


def test_unreachable_rendezvous_stops_the_rank(tmp_path: Path) -> None:
    port = _free_port()
    slurm = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "K2TRAIN_RENDEZVOUS_TIMEOUT": "1"}
    proc, seconds = _k2train(["--config", TINY, *QUIET_RUN, "--set", f"logging.run_root={tmp_path}"], slurm, tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"k2train: error: rank 1 of 4 could not reach the rendezvous at 127.0.0.1:{port}")
    assert seconds < 60


# ---- the sbatch scripts, outside Slurm ----------------------------------------------------------


def test_sbatch_scripts_parse() -> None:
    assert [p.name for p in SCRIPTS] == ["task_per_gpu.sbatch", "torchrun_per_node.sbatch"]
    for path in [*SCRIPTS, SLURM_DIR / "common.sh"]:
        subprocess.run(["bash", "-n", str(path)], check=True)
    for path in SCRIPTS:
        directives = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
        assert directives, path
        # A '#' after the directive starts a comment: an image like nvcr.io#... must be quoted.
        assert all("#" not in line[len("#SBATCH"):] for line in directives), path


def _fake_slurm(tmp_path: Path) -> Path:
    """`scontrol` naming the nodes localhost and node-b, and `srun` recording its arguments (then
    printing $FAKE_SRUN_SAYS and exiting with $FAKE_SRUN_EXIT, default 0)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.txt"
    fakes = {
        "scontrol": "#!/bin/sh\nprintf 'localhost\\nnode-b\\n'\n",
        "srun": ("#!/bin/sh\n"
                 f"printf '%s\\n' \"$@\" > {record}\n"
                 f"env | grep -E '^(MASTER_|NCCL_DEBUG|TORCH_NCCL|K2TRAIN_RENDEZVOUS)' | sort > {record}.env\n"
                 "[ -z \"$FAKE_SRUN_SAYS\" ] || echo \"$FAKE_SRUN_SAYS\" >&2\n"
                 "exit ${FAKE_SRUN_EXIT:-0}\n"),
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def _sbatch(script: str, args: list[str], tmp_path: Path, **job: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "K2TRAIN_", "MASTER_"))}
    env.update(PATH=f"{_fake_slurm(tmp_path)}:{env['PATH']}", K2TRAIN_VENV=sys.prefix, SLURM_SUBMIT_DIR=str(REPO))
    env.update(job)
    return subprocess.run(["bash", str(SLURM_DIR / script), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "localhost,node-b"}


def test_sbatch_outside_slurm_says_how_to_submit(tmp_path: Path) -> None:
    proc = _sbatch("task_per_gpu.sbatch", ["--config", TINY], tmp_path)
    assert proc.returncode == 2 and "submit it with sbatch -N NODES" in _last_line(proc)


@pytest.mark.parametrize("script", ["torchrun_per_node.sbatch", "task_per_gpu.sbatch"])
def test_sbatch_missing_config_stops_before_srun(tmp_path: Path, script: str) -> None:
    proc = _sbatch(script, ["--config", "configs/no_such.yaml"], tmp_path, **JOB)
    assert proc.returncode == 2
    assert "the config file configs/no_such.yaml does not exist" in _last_line(proc)
    assert not (tmp_path / "srun.txt").exists()


def test_sbatch_node_count_the_layout_cannot_use(tmp_path: Path) -> None:
    job = {**JOB, "SLURM_JOB_NUM_NODES": "3", "K2TRAIN_NPROC_PER_NODE": "2"}
    proc = _sbatch("torchrun_per_node.sbatch", ["--config", TINY], tmp_path, **job)
    assert proc.returncode == 2
    assert "a world of 6 ranks is not a multiple of parallel.pp 2 x parallel.ep 2" in proc.stderr
    assert "a world of 6 ranks (3 node(s) x 2 processes) does not fit the layout of configs/k2_tiny.yaml" in _last_line(proc)
    assert not (tmp_path / "srun.txt").exists()


def test_sbatch_unresolvable_rendezvous_host(tmp_path: Path) -> None:
    job = {**JOB, "SLURM_NTASKS_PER_NODE": "2", "K2TRAIN_MASTER_ADDR": "no-such-node.invalid"}
    proc = _sbatch("task_per_gpu.sbatch", ["--config", TINY], tmp_path, **job)
    assert proc.returncode == 2
    assert "the rendezvous host no-such-node.invalid does not resolve" in _last_line(proc)


def test_torchrun_per_node_command(tmp_path: Path) -> None:
    job = {**JOB, "SLURM_GPUS_ON_NODE": "2"}
    proc = _sbatch("torchrun_per_node.sbatch", ["--config", TINY, "--set", "train.steps=3"], tmp_path, **job)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "srun.txt").read_text().splitlines()
    port = 20000 + 4242 % 20000
    venv_bin = f"{sys.prefix}/bin/"
    assert argv[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", f"{venv_bin}torchrun"]
    for arg in ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
                "--rdzv-conf=join_timeout=300,read_timeout=300", "--no-python"]:
        assert arg in argv
    assert argv[argv.index("--no-python") + 1:] == [f"{venv_bin}k2train", "train", "--config", TINY,
                                                     "--set", "train.steps=3"]
    env = (tmp_path / "srun.txt.env").read_text().splitlines()
    assert {"MASTER_ADDR=localhost", f"MASTER_PORT={port}", "NCCL_DEBUG=WARN",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "K2TRAIN_RENDEZVOUS_TIMEOUT=300"} <= set(env)


def test_task_per_gpu_command_in_a_container(tmp_path: Path) -> None:
    """With --image the host's environment is not needed: pyxis runs the image's k2train."""
    job = {**JOB, "SLURM_NTASKS_PER_NODE": "4", "K2TRAIN_VENV": str(tmp_path / "absent"),
           "K2TRAIN_MOUNTS": "/data:/data"}
    proc = _sbatch("task_per_gpu.sbatch", ["--config", TINY, "--image", "registry#k2train:1"], tmp_path, **job)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "srun.txt").read_text().splitlines()
    assert argv == ["--ntasks-per-node=4", "--kill-on-bad-exit=1", "--container-image=registry#k2train:1",
                    f"--container-mounts={REPO}:{REPO},/data:/data", f"--container-workdir={REPO}",
                    "k2train", "train", "--config", TINY]
    assert "8 ranks (each rank checks the layout at start)" in proc.stdout


def test_task_per_gpu_refuses_nproc_per_node(tmp_path: Path) -> None:
    proc = _sbatch("task_per_gpu.sbatch", ["--config", TINY, "--nproc-per-node", "4"], tmp_path, **JOB)
    assert proc.returncode == 2 and "here it is sbatch's --ntasks-per-node" in _last_line(proc)


def test_failed_torchrun_rendezvous_is_named(tmp_path: Path) -> None:
    job = {**JOB, "SLURM_GPUS_ON_NODE": "2", "FAKE_SRUN_EXIT": "1",
           "FAKE_SRUN_SAYS": "torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: "
                             "The connection to the C10d store has failed."}
    proc = _sbatch("torchrun_per_node.sbatch", ["--config", TINY], tmp_path, **job)
    assert proc.returncode == 2
    port = 20000 + 4242 % 20000
    assert f"did not all meet in torchrun's rendezvous at localhost:{port} within 300 s" in _last_line(proc)


def test_failed_step_reports_its_status(tmp_path: Path) -> None:
    job = {**JOB, "SLURM_NTASKS_PER_NODE": "2", "FAKE_SRUN_EXIT": "3", "FAKE_SRUN_SAYS": "k2train: error: boom."}
    proc = _sbatch("task_per_gpu.sbatch", ["--config", TINY], tmp_path, **job)
    assert proc.returncode == 2
    assert "k2train: error: boom." in proc.stdout
    assert _last_line(proc).endswith("the training step failed (srun exit status 3); the ranks' errors are above.")


# ---- docker/: the dependency list of the image and the entrypoint ------------------------------


def test_image_requirements_keep_the_base_packages(tmp_path: Path) -> None:
    """torch and whatever the base has are left to the base; only missing packages are listed."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch==9.9", "numpy==0.1", "no-such-dist-k2==1.0"]\n')
    proc = subprocess.run([sys.executable, str(REPO / "docker" / "requirements.py"), str(pyproject)],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ["no-such-dist-k2==1.0"]
    assert "keeping the base image's torch" in proc.stderr and "keeping the base image's numpy" in proc.stderr


def test_entrypoint_rejects_a_bad_process_count() -> None:
    entrypoint = REPO / "docker" / "entrypoint.sh"
    subprocess.run(["bash", "-n", str(entrypoint)], check=True)
    env = {**os.environ, "K2TRAIN_NPROC_PER_NODE": "eight"}
    proc = subprocess.run(["bash", str(entrypoint), "train", "--config", TINY], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "K2TRAIN_NPROC_PER_NODE is 'eight', expected a positive whole number" in proc.stderr
