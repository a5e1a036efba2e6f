"""bench/certify_vs_peer.py without the peer's source: one line and exit 0; a wrong --peer path: a clear error."""
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "certify_vs_peer.py")


def _run(*arguments):
    return subprocess.run([sys.executable, SCRIPT, *arguments], capture_output=True, text=True, timeout=120)


def test_without_peer_says_so_and_exits_0():
    run = _run()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and "--peer PATH" in lines[0]


def test_wrong_peer_path_is_a_clear_error(tmp_path):
    run = _run("--peer", str(tmp_path / "nowhere"), "--smoke")
    assert run.returncode != 0
    assert "no auto_LiRPA source there" in run.stderr and "nowhere" in run.stderr
    assert "Traceback" not in run.stderr
