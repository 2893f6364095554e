"""Nothing lost on a shared cluster: stop signals, requeue, full disks, bad paths, a dead rank."""

import json
import os
import signal
import subprocess
import sys
import time

import helpers
import pytest
import torch

import train
from plumbing import runs, runtime
from plumbing.errors import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_args(root, out, *extra):
    return helpers.micro_args(root, out, "--log-every", "1", "--eval-every", "100", *extra)


def last(run):
    return runs.read_checkpoint(os.path.join(run, "last.pt"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def signal_after(monkeypatch, step, sig):
    """Send `sig` to this process right after optimizer step `step` (inside the loop)."""
    real = train.train_step

    def stepping(loop, *args):
        real(loop, *args)
        if loop.run.step == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(train, "train_step", stepping)


@pytest.fixture(scope="module")
def uninterrupted(micro_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train.main(micro_args(micro_root, out, "--iters", "5"))
    return last(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_checkpoints_the_step_and_the_resumed_run_is_the_same(
    sig, micro_root, tmp_path, monkeypatch, capsys, uninterrupted
):
    out, before = tmp_path / "run", signal.getsignal(sig)
    signal_after(monkeypatch, 2, sig)
    with pytest.raises(SystemExit) as stop:
        train.main(micro_args(micro_root, out, "--iters", "5"))
    assert stop.value.code == runtime.EXIT_STOPPED
    assert last(out)["step"] == 2  # the step reached, not an epoch end
    said = capsys.readouterr().out
    assert (
        f"stopped by {signal.Signals(sig).name} after step 2" in said and f"--resume {out}" in said
    )
    assert signal.getsignal(sig) == before  # the previous handler is back
    if sig == signal.SIGTERM:  # what happens next does not depend on which signal it was
        monkeypatch.undo()
        train.main(["--resume", str(out)])
        assert last(out)["step"] == 5 and same_weights(last(out)["model"], uninterrupted["model"])


def test_a_second_ctrl_c_stops_at_once(micro_root, tmp_path, monkeypatch):
    real = train.train_step

    def stepping(loop, *args):
        real(loop, *args)
        if loop.run.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "train_step", stepping)
    with pytest.raises(KeyboardInterrupt):
        train.main(micro_args(micro_root, tmp_path / "run", "--iters", "5"))


def start_job(cmd, ready):
    """cmd started in a process group of its own, as a cluster starts a job, one thread a process;
    returned once ready() holds, an assertion (with its stderr) if it ends or 240 s pass first."""
    env, pipe = dict(os.environ, OMP_NUM_THREADS="1"), subprocess.PIPE
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=pipe, stderr=pipe, text=True, start_new_session=True, env=env
    )
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    return proc


def test_sigterm_to_the_whole_process_group_with_loader_workers(micro_root, tmp_path):
    """As a cluster sends it: to every process of the job, the loader workers included."""
    out = tmp_path / "run"
    argv = micro_args(micro_root, out, "--iters", "400", "--workers", "1")
    log = out / "log.jsonl"
    proc = start_job(
        [sys.executable, os.path.join(ROOT, "train.py"), *argv],
        lambda: log.is_file() and log.read_text().count("\n") >= 2,
    )
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == runtime.EXIT_STOPPED, stderr[-2000:]
    assert "Traceback" not in stderr
    logged = max(json.loads(x)["step"] for x in open(out / "log.jsonl"))
    assert last(out)["step"] >= logged >= 2 and "stopped by SIGTERM" in stdout


def test_the_same_command_again_continues_the_run(micro_root, tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    train.main(
        micro_args(micro_root, out, "--iters", "5", "--stop-at", "3")
    )  # the job's first slot
    train.main(micro_args(micro_root, out, "--iters", "5"))  # requeued: same command
    assert "holds last.pt of this command's run (step 3)" in capsys.readouterr().out
    assert same_weights(last(out)["model"], uninterrupted["model"])
    records = [json.loads(x) for x in open(out / "log.jsonl") if '"train"' in x]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # one log, no restart


def test_the_same_folder_with_another_config_is_refused(micro_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "2"))
    with pytest.raises(SystemExit) as e:
        cli(lambda: train.main(micro_args(micro_root, out, "--iters", "2", "--tau", "0.9")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "tau: 0.95 there, 0.9 here" in err and f"--resume {out}" in err


def test_an_unwritable_out_fails_before_any_model_is_built(
    micro_root, tmp_path, monkeypatch, capsys
):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(train, "new_model", lambda *a: pytest.fail("the model was built first"))
    with pytest.raises(SystemExit) as e:
        cli(lambda: train.main(micro_args(micro_root, tmp_path / "a_file" / "run", "--iters", "2")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "a_file/run" in err and "cannot create or write" in err


def test_the_cli_on_an_unwritable_out_exits_2_without_traceback(tmp_path):
    (tmp_path / "a_file").write_text("")
    t = time.time()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "a_file" / "run")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--out" in proc.stderr
    assert time.time() - t < 60


def test_a_disk_too_small_for_the_checkpoints_fails_before_step_1(
    micro_root, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 2**20})())
    monkeypatch.setattr(train, "train_step", lambda *a: pytest.fail("a step ran"))
    with pytest.raises(SystemExit) as e:
        cli(lambda: train.main(micro_args(micro_root, tmp_path / "run", "--iters", "2")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "0.01 GiB free" in err and "needs" in err


def test_a_write_that_fails_keeps_the_previous_checkpoint(
    micro_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "2", "--stop-at", "1"))
    good = last(out)
    real, calls = torch.save, []

    def full_disk(obj, path, *a, **k):
        calls.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        cli(lambda: train.main(["--resume", str(out)]))
    monkeypatch.setattr(runs.torch, "save", real)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No space left on device" in err and "last.pt" in err
    assert calls and not any(os.path.exists(p) for p in calls)  # no half-written file left
    assert same_weights(last(out)["model"], good["model"]) and last(out)["step"] == 1


def test_a_truncated_last_pt_points_to_the_previous_one(micro_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "3", "--save-every", "1", "--stop-at", "2"))
    assert (out / "last.prev.pt").is_file() and last(out)["step"] == 2
    raw = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(SystemExit) as e:
        cli(lambda: train.main(["--resume", str(out)]))
    err = capsys.readouterr().err
    assert (
        e.value.code == 2 and "cannot read checkpoint" in err and "(step 1)" in err and "mv " in err
    )


def test_a_checkpoint_of_another_model_is_named(micro_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "1"))
    state = last(out)
    state["model_args"]["kinds"] = ["dinov3", "clip"]  # the weights are clip, dinov3
    torch.save(state, out / "other.pt")
    with pytest.raises(SystemExit) as e:
        cli(lambda: runs.load_run(str(out / "other.pt")))
    assert e.value.code == 2 and "do not fit the model" in capsys.readouterr().err


def test_a_killed_rank_ends_the_two_process_run_with_the_checkpoint_kept(micro_root, tmp_path):
    out = tmp_path / "ddp"
    argv = micro_args(
        micro_root, out, "--iters", "400", "--save-every", "1", "--mix-source", "rolled"
    )
    proc = start_job(helpers.torchrun_cmd(29531, *argv), (out / "last.pt").is_file)
    rank1 = [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit()
        and _env(p).get("RANK") == "1"
        and _env(p).get("MASTER_PORT") == "29531"
        and _env(p).get("LOCAL_RANK") == "1"
    ]
    assert rank1, "rank 1 not found"
    os.kill(min(rank1), signal.SIGKILL)
    t = time.time()
    proc.communicate(timeout=60)  # ends within a minute, no rank left hanging
    assert proc.returncode != 0 and time.time() - t < 60
    assert last(out)["step"] >= 1  # the last good checkpoint is intact and readable


def _env(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(
                x.split("=", 1) for x in f.read().decode(errors="replace").split("\0") if "=" in x
            )
    except OSError:
        return {}


def test_a_checkpoint_of_the_previous_format_evaluates_and_resumes_as_it_started(
    micro_root, tmp_path
):
    """Format 1 (before global batches): no "format" key, cfg["batch"] per process, epochs dropping
    the remainder. It resumes with ITS rule (12 unlabelled tiles here at 1/4 of 16;
    14 with --ratio 1/8: not a multiple of 4, so the two rules differ) and evaluates."""
    out = tmp_path / "old"
    train.main(micro_args(micro_root, out, "--ratio", "1/8", "--iters", "9", "--stop-at", "2"))
    state = last(out)
    n = sum(1 for _ in open(out / "splits" / "unlabeled.txt"))
    cfg = {
        k: v
        for k, v in state["cfg"].items()
        if k
        not in (
            "global_batch",
            "micro_batch",
            "world_size",
            "iters_per_epoch",
            "total_iters",
            "epoch_rule",
            "command",
        )
    }
    old = {k: v for k, v in state.items() if k != "format"}
    torch.save(dict(old, cfg=cfg), out / "last.pt")
    assert n % 4 and n // 2 != -(-n // 4) * 4 // 2  # the two rules differ here
    train.main(["--resume", str(out)])
    resumed = last(out)
    assert resumed["step"] == 9 and resumed["cfg"]["iters_per_epoch"] == n // 2  # the old rule
    assert resumed["cfg"]["batch"] == 2 and resumed["format"] == runs.FORMAT
    model, _, _ = runs.load_run(str(out / "last.pt"))
    assert len(model.students) == 2
