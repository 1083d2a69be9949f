"""gradcomp-launch under interruption, on loopback, against a silent --address (issue 19).

The launcher runs in its own session (``start_new_session``), so everything it and its embedded
Ray start can be found afterwards by session id in /proc; Ctrl-C is simulated as a terminal
sends it, SIGINT to the whole process group.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e .[ray])")

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _launch(args, out, **kw):
    exe = Path(sys.executable).with_name("gradcomp-launch")
    cmd = [str(exe) if exe.exists() else "gradcomp-launch", *args, "--quiet", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, RAY_DEDUP_LOGS="1"), **kw)


def _stat(pid: int):
    """(comm, ppid, pgid, sid) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, int(fields[1]), int(fields[2]), int(fields[3])


def _session(sid: int) -> dict[int, str]:
    """Processes of session ``sid`` (or its process group), by pid."""
    found = {}
    for d in Path("/proc").glob("[0-9]*"):
        st = _stat(int(d.name))
        if st is not None and (st[3] == sid or st[2] == sid):
            found[int(d.name)] = st[0]
    return found


def _listening(pids) -> list[tuple[str, int, int, str]]:
    """Listening TCP sockets of ``pids``: (address, port, pid, command)."""
    inodes = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            inodes[f[9]] = (addr, int(hexport, 16))
    found = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        comm = (_stat(pid) or ("?",))[0]
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.append((*inodes[target[8:-1]], pid, comm))
    return sorted(set(found))


def _restore_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("gradcomp-restore-*")}


def _assert_nothing_left(proc, restore_before):
    deadline = time.monotonic() + 10
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session(proc.pid) == {}, f"left running: {_session(proc.pid)}"
    assert list(Path(tempfile.gettempdir()).glob(f"gcray-{proc.pid}-*")) == []  # the embedded Ray's temp root
    assert _restore_dirs() <= restore_before


def _wait_for(predicate, timeout, proc, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"launcher exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.2)


def _sigint(proc, timeout=60):
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running {timeout} s after SIGINT")
    return time.monotonic() - t0, out, err


@pytest.mark.timeout(120)
def test_ctrl_c_during_ray_start_exits_130_and_leaves_nothing(tmp_path):
    restore_before = _restore_dirs()
    proc = _launch(["--workers", "2", "--codec", "fp", "--width", "8", "--epochs", "1", "--max-steps", "5"],
                   tmp_path / "run")
    # Ray is starting: its GCS runs, the workers do not yet
    _wait_for(lambda: "gcs_server" in _session(proc.pid).values(), 60, proc, "the GCS")
    took, _, err = _sigint(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "gradcomp-launch: interrupted" in err and "Traceback" not in err, err[-3000:]
    _assert_nothing_left(proc, restore_before)
    print(f"SIGINT during ray.init: exit 130 after {took:.1f} s")


@pytest.mark.timeout(240)
def test_loopback_only_then_ctrl_c_mid_training_then_resume(tmp_path):
    """One embedded run: every listening socket of its process tree is on loopback; Ctrl-C
    after the first checkpoint exits 130 and leaves nothing; --resume finishes the job."""
    out = tmp_path / "run"
    restore_before = _restore_dirs()
    args = ["--workers", "2", "--codec", "prune-fp", "--width", "8", "--epochs", "20", "--max-steps", "100",
            "--checkpoint-every", "10"]
    proc = _launch(args, out)
    seen = set()

    def poll_sockets():
        seen.update(_listening(_session(proc.pid)))
        return (out / "checkpoints" / "latest").is_file()

    _wait_for(poll_sockets, 120, proc, "the first checkpoint")
    for _ in range(5):  # a few more looks while training runs (the rendezvous store, gloo)
        seen.update(_listening(_session(proc.pid)))
        time.sleep(0.2)
    exposed = [s for s in seen if s[0] not in LOOPBACK]
    assert exposed == [], exposed
    commands = {s[3] for s in seen}
    assert {"gcs_server", "raylet"} <= commands and any("RayTrainWo" in c for c in commands), commands
    print(f"{len(seen)} listening sockets, all loopback: " + ", ".join(f"{a}:{p} {c}" for a, p, _, c in sorted(seen)))

    took, _, err = _sigint(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "gradcomp-launch: interrupted" in err and "--resume" in err, err[-3000:]
    _assert_nothing_left(proc, restore_before)
    assert not (out / "results.json").exists()
    print(f"SIGINT mid-training: exit 130 after {took:.1f} s")

    proc = _launch(args + ["--resume"], out)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the resumed run did not finish")
    assert proc.returncode == 0, err[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 100 and res["resumed_from_step"] is not None and res["resumed_from_step"] >= 10
    _assert_nothing_left(proc, restore_before)


@pytest.mark.timeout(120)
def test_address_that_never_answers_fails_within_the_startup_timeout(tmp_path):
    # something accepts connections but never speaks Ray: ray.init alone retries for minutes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        t0 = time.monotonic()
        proc = _launch(["--address", f"127.0.0.1:{s.getsockname()[1]}", "--startup-timeout", "5"], tmp_path / "run")
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("still connecting after 60 s")
        took = time.monotonic() - t0
    assert proc.returncode == 1, err[-3000:]
    assert "did not finish connecting within --startup-timeout 5 s" in err, err[-3000:]
    assert took < 30, took
    print(f"silent --address: exit 1 after {took:.1f} s")
