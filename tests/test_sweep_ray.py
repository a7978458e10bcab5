"""Sweeps on a real two-node Ray cluster on loopback (`ray start --head` + `ray start
--address`): points run as Ray tasks on both nodes and record where they ran; killing one
node's raylet mid-sweep still ends with every point done (its task is retried on the other
node and resumes); an unreachable --address is one line, exit 2, nothing written."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from jaxaccel import cli, sweep

ray = pytest.importorskip("ray")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

EXPERIMENT = """
from jaxaccel import sweep
from jaxaccel.config import default_config

def get_config():
    c = default_config()
    c.dataset.name, c.model.name = "digits", "lenet300_100"
    c.num_steps, c.batch_size, c.eval_batch_size = 8, 32, 360
    c.log_every, c.checkpoint_every = 4, 4
    c.parallel.num_devices, c.progress = 1, False
    return c

def get_sweep():
    return sweep.product(sweep.grid("optimizer.lr", [1e-3, 3e-3]), sweep.seeds(2))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, temp_dir):
    p = subprocess.run([RAY, "start", *args, "--num-cpus=1", f"--temp-dir={temp_dir}",
                        "--disable-usage-stats", f"--node-manager-port={_free_port()}",
                        f"--object-manager-port={_free_port()}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"ray start {' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"


def _pids(marker: str) -> list[int]:
    """Processes of one Ray node: those whose command line names its temp dir."""
    return [int(pid) for pid in os.listdir("/proc")
            if pid.isdigit() and any(marker in arg for arg in _cmdline(int(pid)))]


def _raylet(marker: str) -> int:
    pids = _pids(marker)
    found = [pid for pid in pids if os.path.basename(_cmdline(pid)[0]) == "raylet"]
    assert found, (marker, [_cmdline(pid)[:1] for pid in pids])
    return found[0]


def _cmdline(pid: int) -> list[str]:
    try:
        return open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
        return [""]


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node on 127.0.0.1, each with its own temp dir and 1 CPU. Ray's
    token authentication is off for this private loopback cluster (a ~/.ray/auth_token left by
    another local Ray would otherwise switch it on for the head only)."""
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the nodes, the sweep's driver and its tasks
    head_dir = tempfile.mkdtemp(prefix="jxrh", dir="/tmp")
    worker_dir = tempfile.mkdtemp(prefix="jxrw", dir="/tmp")
    port = _free_port()
    try:
        _start(["--head", f"--port={port}", "--include-dashboard=false"], head_dir)
        _start([f"--address=127.0.0.1:{port}"], worker_dir)
        yield f"127.0.0.1:{port}", head_dir, worker_dir
    finally:
        for marker in (worker_dir, head_dir):
            for pid in _pids(marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _worker_of(point_dir):
    path = os.path.join(point_dir, "results.json")
    return json.load(open(path))["worker"] if os.path.isfile(path) else None


def test_a_search_runs_its_trials_as_ray_tasks_on_both_nodes(cluster, tmp_path, capsys):
    """Trials asked by the sweep, trained (reporting and telling the study) in Ray tasks: as
    many at once as the cluster has slots (one per node here)."""
    address = cluster[0]
    experiment = tmp_path / "search.py"
    experiment.write_text(EXPERIMENT.replace("c.parallel.num_devices", "c.dataset."
                                             "validation_split = 0.2\n    c.parallel.num_devices")
                          + "\ndef get_search():\n"
                            "    return {'optimizer.lr': sweep.loguniform(1e-4, 1e-2)}\n")
    workdir = tmp_path / "search"
    code = cli.main(["sweep", "--config", str(experiment), "--workdir", str(workdir), "--search",
                     "random", "--trials", "2", "--engine", "ray", "--address", address])
    assert code == 0, capsys.readouterr()
    body = json.load(open(workdir / "search.json"))
    assert [t["state"] for t in body["trials"]] == ["complete"] * 2
    nodes = {json.load(open(workdir / t["workdir"] / "results.json"))["worker"]["ray_node_id"]
             for t in body["trials"]}
    assert len(nodes) == 2 and None not in nodes
    for t in body["trials"]:  # the value is the trial's own validation accuracy
        results = json.load(open(workdir / t["workdir"] / "results.json"))
        assert t["value"] == results["validation_accuracy"]


def test_points_run_on_both_nodes_and_survive_a_dead_node(cluster, tmp_path):
    address, _, worker_dir = cluster
    experiment = tmp_path / "exp.py"
    experiment.write_text(EXPERIMENT)
    workdir = str(tmp_path / "sweep")
    head_node = json.loads(subprocess.run(
        [sys.executable, "-c", "import ray, json; ray.init(address=%r, logging_level='ERROR');"
         "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and "
         "n['NodeManagerAddress'] and n['Resources'].get('node:__internal_head__')]))"
         % address], capture_output=True, text=True, timeout=120).stdout)[0]
    killed = {}

    def attempts(point):  # the Ray nodes a point's task started on, in order (its log's headers)
        path = os.path.join(point, "log.txt")
        text = open(path).read() if os.path.isfile(path) else ""
        return [line.split("(Ray node ")[1].split(")")[0] for line in text.splitlines()
                if line.startswith("# on ")]

    def kill_worker_node_while_it_runs_its_second_point():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            points = glob.glob(os.path.join(workdir, "*", ""))
            finished = [(_worker_of(p) or {}).get("ray_node_id") for p in points]
            running = [p for p in points if _worker_of(p) is None and attempts(p)
                       and attempts(p)[-1] != head_node]
            if any(n and n != head_node for n in finished) and running:
                killed.update(node=attempts(running[0])[-1], point=running[0])
                os.kill(_raylet(worker_dir), signal.SIGKILL)
            time.sleep(0.1)

    errors = []

    def killer_thread():
        try:
            kill_worker_node_while_it_runs_its_second_point()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    killer = threading.Thread(target=killer_thread)
    killer.start()
    result = sweep.run(str(experiment), workdir, engine="ray", address=address, report=False)
    killer.join()
    assert not errors and killed, (errors, "the worker node never ran a second point")
    assert not result.failed and all(r.status == sweep.DONE for r in result.runs)
    nodes = {_worker_of(r.workdir)["ray_node_id"] for r in result.runs}
    assert nodes == {head_node, killed["node"]}  # points finished on both nodes
    # the point running on the dead node was retried on the live one
    assert attempts(killed["point"]) == [killed["node"], head_node]
    assert _worker_of(killed["point"])["ray_node_id"] == head_node
    for r in result.runs:
        assert json.load(open(os.path.join(r.workdir, "results.json")))["steps"] == 8
        assert json.load(open(os.path.join(r.workdir, "point.json")))["engine"] == "ray"


def test_an_unreachable_address_is_one_line(tmp_path, capsys):
    experiment = tmp_path / "exp.py"
    experiment.write_text(EXPERIMENT)
    workdir = tmp_path / "sweep"
    code = cli.main(["sweep", "--config", str(experiment), "--workdir", str(workdir),
                     "--engine", "ray", "--address", f"127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no Ray head answers there" in err[0], err
    assert not workdir.exists()
