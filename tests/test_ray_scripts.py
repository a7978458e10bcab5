"""scripts/ray/cluster.sh can't reach GPU hosts here; --dry-run prints the exact commands."""
import os
import subprocess

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ray", "cluster.sh")


def dry(*args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30)


def test_head_on_the_first_host_and_the_others_join_it():
    p = dry("--hosts", "gpu1,gpu2,gpu3", "--port", "7000", "--dry-run")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.replace("\\", "").splitlines()
    assert lines[0].startswith("+ ssh gpu1 ") and "ray start --head --port=7000" in lines[0]
    for host, line in zip(("gpu2", "gpu3"), lines[1:3]):
        assert line.startswith(f"+ ssh {host} ") and "ray start --address=gpu1:7000" in line
    assert "--engine ray --address gpu1:7000" in lines[-1]


def test_stop_on_every_host():
    p = dry("--hosts", "gpu1,gpu2", "--stop", "--dry-run")
    assert p.returncode == 0 and p.stdout.replace("\\", "").count("ray stop") == 2


def test_bad_arguments_are_one_line_usage_errors():
    for args, needle in ((("--dry-run",), "usage:"), (("--hosts", "a", "--port", "x"), "'x'"),
                         (("--hosts", "a", "--bogus"), "unknown argument '--bogus'")):
        p = dry(*args)
        assert p.returncode == 2 and needle in p.stderr and len(p.stderr.splitlines()) == 1
