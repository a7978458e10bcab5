"""scripts/tpu/*.sh can't run here (no gcloud); --dry-run prints the exact commands."""
import os
import subprocess

import pytest

TPU = os.path.join(os.path.dirname(__file__), "..", "scripts", "tpu")


def dry(script, *args, env=None):
    return subprocess.run(["bash", os.path.join(TPU, script), "--dry-run", *args],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": "/usr/bin:/bin", **(env or {})})


def test_create_prints_create_and_install_on_all_workers():
    p = dry("create.sh", "--name", "t1", "--zone", "z1", "--accelerator", "v4-16")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.replace("\\", "").splitlines()
    assert "tpu-vm create t1 --zone z1 --accelerator-type v4-16" in lines[0]
    assert "--worker=all" in lines[1] and "pip install" in lines[1]


@pytest.mark.parametrize("sweep,cmd", [("0", "jaxaccel train"), ("1", "jaxaccel sweep")])
def test_run_on_every_host_with_bucket_dirs(sweep, cmd):
    p = dry("run.sh", "--name", "t1", "experiments/cifar10_resnet20.py", "gs://b/runs/r20",
            "gs://b/tfds", "--config.num_steps=10", env={"SWEEP": sweep})
    assert p.returncode == 0, p.stderr
    out = p.stdout.replace("\\", "")
    assert "--worker=all" in out and cmd in out and "JAXACCEL_DISTRIBUTED=auto" in out
    assert "--workdir gs://b/runs/r20" in out and "data_dir=gs://b/tfds" in out
    assert "--config.num_steps=10" in out


def test_run_without_arguments_is_usage_error():
    p = dry("run.sh")
    assert p.returncode == 2 and "usage:" in p.stderr


def test_delete():
    p = dry("delete.sh", "--name", "t1")
    assert p.returncode == 0 and "tpu-vm delete t1" in p.stdout


def test_ray_cluster_over_the_hosts_head_on_worker_0():
    p = dry("ray.sh", "--name", "t1", "--zone", "z1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.replace("\\", "").splitlines()
    head = next(line for line in lines if "--worker=0" in line)
    assert "ray start --head --port=6379" in head and "tpu-vm ssh t1 --zone z1" in head
    join = next(line for line in lines if "--worker=all" in line)
    assert "ray start --address=HEAD_IP:6379" in join and "pip install -q -e '.[ray]'" in join
    assert "--engine ray --address HEAD_IP:6379" in lines[-1]
