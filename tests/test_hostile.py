"""A hostile user of a shared cluster: every exit path exits, one training per folder, a checkpoint
never decides where to write or runs code, numbers are checked, a stop during an evaluation is
prompt, srun's tasks are one run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import micro_args, torchrun_cmd

import eval as evaluation
import train
from plumbing import catalog, runs, runtime
from plumbing.errors import UserError, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exit_code(argv, capsys=None):
    """The exit status of train.main(argv) under the command line's error contract, and stderr."""
    with pytest.raises(SystemExit) as e:
        cli(lambda: train.main(argv))
    return e.value.code, capsys.readouterr().err if capsys else ""


def run_script(code, timeout=150):
    """Run Python code in a fresh process from the repository root; (returncode, stderr, seconds)."""
    start = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # a hang fails here
    return proc.returncode, proc.stderr, time.time() - start


@pytest.mark.parametrize("where", ["main", "worker"])
def test_an_error_in_the_main_process_or_in_a_loader_worker_ends_the_run(
    micro_root, tmp_path, where
):
    """Loader workers ignore the stop signals; they must still never keep their parent alive."""
    if where == "main":
        fault = "train.log_train = lambda *a: 1 / 0"
    else:
        fault = (
            "real = data.SemiDataset.__getitem__\n"
            "def bad(self, key):\n"
            "    if key[1] == 3: raise RuntimeError('a broken worker')\n"
            "    return real(self, key)\n"
            "data.SemiDataset.__getitem__ = bad"
        )
    argv = micro_args(micro_root, tmp_path / "r", "--iters", "4", "--log-every", "1")
    argv[argv.index("--workers") + 1] = "2"
    code = f"import data, train\n{fault}\ntrain.main({argv!r})"
    rc, err, seconds = run_script(code)
    assert rc != 0 and ("ZeroDivisionError" in err if where == "main" else "a broken worker" in err)
    assert seconds < 150  # (run_script's timeout: a process that hangs fails the test there)


def test_one_training_per_folder_and_a_killed_one_leaves_no_stale_lock(
    micro_root, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = micro_args(micro_root, out, "--iters", "400", "--eval-every", "100")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "train.py", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            if (out / "config.json").is_file():
                break
            time.sleep(0.2)
        code, err = exit_code(argv, capsys)
        assert code == 2 and f"pid {first.pid}" in err and "in use" in err
    finally:
        first.kill()  # SIGKILL: no cleanup runs
        first.wait()
    assert (out / ".lock").is_file()
    train.main(
        micro_args(micro_root, out, "--iters", "400", "--eval-every", "100", "--stop-at", "1")
    )
    assert runs.read_checkpoint(str(out / "last.pt"))["step"] == 1


def test_a_copied_or_moved_folder_resumes_in_place(micro_root, tmp_path):
    original = tmp_path / "run"
    train.main(micro_args(micro_root, original, "--iters", "2", "--stop-at", "1"))
    copy, moved = tmp_path / "copy", tmp_path / "moved"
    shutil.copytree(original, copy)
    train.main(["--resume", str(copy)])
    assert runs.read_checkpoint(str(copy / "last.pt"))["step"] == 2
    assert runs.read_checkpoint(str(original / "last.pt"))["step"] == 1  # untouched
    shutil.move(str(original), str(moved))
    train.main(["--resume", str(moved)])
    assert runs.read_checkpoint(str(moved / "last.pt"))["step"] == 2


def test_an_out_that_holds_something_else_is_refused(micro_root, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my thesis")
    code, err = exit_code(micro_args(micro_root, foreign, "--iters", "1"), capsys)
    assert code == 2 and "notes.txt" in err and (foreign / "notes.txt").read_text() == "my thesis"
    run = tmp_path / "run"
    train.main(micro_args(micro_root, run, "--iters", "1", "--eval-every", "100"))
    (run / "last.pt").unlink()  # another run of that folder, its checkpoint deleted
    code, err = exit_code(micro_args(micro_root, run, "--iters", "1", "--tau", "0.9"), capsys)
    assert code == 2 and "another run" in err


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"cfg": {}, "model": Payload(), "model_args": {}}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        runs.read_checkpoint(str(tmp_path / "evil.pt"))
    code, err = exit_code(["--init", str(tmp_path / "evil.pt")], capsys)
    assert code == 2 and "evil.pt" in err
    with pytest.raises(SystemExit):
        cli(lambda: evaluation.main([str(tmp_path / "evil.pt")]))
    assert not marker.exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--iters", "0"),
        ("--iters", "-5"),
        ("--crop", "0"),
        ("--crop", "-16"),
        ("--log-every", "0"),
        ("--workers", "-1"),
        ("--batch", "0"),
        ("--tau", "0"),
        ("--lr", "0"),
        ("--epochs", "0"),
        ("--eval-every", "0"),
    ],
)
def test_every_number_is_checked_when_parsed(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("text", ["[1, 2]", '"potsdam"', "3"])
def test_a_config_file_that_is_not_a_json_object_is_one_line(tmp_path, capsys, text):
    """--config on valid JSON that is not an object (a list, a string, a number): the one-line
    error naming the file, exit 2, no traceback."""
    path = tmp_path / "list.json"
    path.write_text(text)
    code, err = exit_code(["--config", str(path)], capsys)
    assert code == 2 and "neither the config.json" in err and str(path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_flag_that_cannot_apply_on_resume_is_an_error(micro_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "2", "--stop-at", "1"))
    code, err = exit_code(["--resume", str(out), "--lr", "1", "--batch", "4"], capsys)
    assert code == 2 and "--lr" in err and "--batch" in err


def test_classes_txt_takes_hex_colours_and_hashes_in_names(tmp_path):
    (tmp_path / "classes.txt").write_text(
        "# a comment line\nwater #0000ff | lake, river\nC# water 1,2,3\nsoil\n"
    )
    info = catalog.dataset_info("custom", str(tmp_path))
    assert info.classes == ["water", "C# water", "soil"]
    assert info.palette[:2] == [(0, 0, 255), (1, 2, 3)] and info.concepts[0] == [
        "water",
        "lake",
        "river",
    ]


def test_a_checkpoint_carries_its_classes_and_palette(micro_root, tmp_path):
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "1", "--eval-every", "100"))
    _, info, _ = runs.load_run(str(out / "last.pt"), data_root=str(tmp_path / "elsewhere"))
    assert info.classes == catalog.DATASETS["demo"].classes
    assert [tuple(c) for c in info.palette] == catalog.DATASETS["demo"].palette


def test_sigterm_during_an_evaluation_exits_at_the_next_image_and_the_resume_repeats_it(
    micro_root, tmp_path, monkeypatch
):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main(micro_args(micro_root, full, "--iters", "12"))  # 6 steps an epoch
    real, when = evaluation.predict, {}

    def signalling(*a, **kw):  # the first image of the first evaluation: a SIGTERM arrives
        if not when:
            when["sent"] = time.time()
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(evaluation, "predict", signalling)
    with pytest.raises(SystemExit) as e:
        train.main(micro_args(micro_root, cut, "--iters", "12"))
    seconds = time.time() - when["sent"]
    assert e.value.code == runtime.EXIT_STOPPED and seconds < 30
    print(f"signal to exit during an evaluation: {seconds:.2f} s")
    step = runs.read_checkpoint(str(cut / "last.pt"))["step"]
    assert step == 6 and not (cut / "metrics.json").exists()  # the epoch's end, not evaluated
    monkeypatch.setattr(evaluation, "predict", real)
    train.main(["--resume", str(cut)])
    a, b = (json.load(open(d / "metrics.json")) for d in (full, cut))
    assert a["last"] == b["last"] and a["best"] == b["best"]
    evals = [json.loads(x)["step"] for x in open(cut / "log.jsonl") if '"eval"' in x]
    assert evals == [6, 12]  # the interrupted evaluation, repeated, then the last


def test_a_stop_after_the_last_step_of_a_finished_run_exits_0(micro_root, tmp_path, monkeypatch):
    real = train.keep_best

    def keeping(loop, result):
        real(loop, result)
        if loop.run.step == loop.total_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "keep_best", keeping)
    train.main(micro_args(micro_root, tmp_path / "run", "--iters", "2"))  # returns: exit 0
    assert json.load(open(tmp_path / "run" / "metrics.json"))["done"]


def test_a_better_best_survives_a_kill_after_its_evaluation(micro_root, tmp_path):
    """last.pt is written before the evaluation, so it does not know that evaluation's best; the
    resumed run takes the best from metrics.json, written with best.pt."""
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "18", "--stop-at", "6"))  # 6 steps an epoch
    stale = runs.read_checkpoint(str(out / "last.pt"))["best"]
    best = json.load(open(out / "metrics.json"))["best"]
    assert stale["miou"] < best["miou"] and best["step"] == 6
    train.main(["--resume", str(out)])
    final = json.load(open(out / "metrics.json"))["best"]
    assert final["miou"] >= best["miou"]
    assert runs.read_checkpoint(str(out / "best.pt"))["step"] == final["step"]


def test_srun_tasks_are_one_run(micro_root, tmp_path):
    """Two tasks started as srun starts them (no torchrun): one 2-process run, one log."""
    out = tmp_path / "run"
    argv = micro_args(micro_root, out, "--iters", "2", "--log-every", "1", "--eval-every", "100")
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost",
            SLURM_JOB_ID="4242",
            MASTER_PORT="29547",
        )
        env.pop("RANK", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "train.py", *argv],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "global batch 2 = 2 processes" in outs[0][0] and "run folder" not in outs[1][0]
    records = [json.loads(x) for x in open(out / "log.jsonl")]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]


def test_the_readmes_torchrun_requeue_recipe_continues_the_run(micro_root, tmp_path):
    """SIGTERM to the torchrun agent (what `sbatch --signal=TERM@120` sends to the job step): the
    workers stop after their step with last.pt; torchrun's exit code says nothing useful, so the
    recipe requeues while metrics.json is not done, and the same command again ends the run
    equal to an uninterrupted one."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def torchrun(out, port):
        argv = micro_args(
            micro_root, out, "--iters", "6", "--eval-every", "100", "--log-every", "1"
        )
        cmd = torchrun_cmd(port, *argv)
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def done(out):
        path = out / "metrics.json"  # the recipe's test: grep -q '"done": true' OUT/metrics.json
        return path.is_file() and '"done": true' in path.read_text()

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert torchrun(full, 29561).wait(timeout=300) == 0
    proc = torchrun(cut, 29563)
    for _ in range(1500):  # wait for step 1 to be logged, then stop the job as SLURM does
        if (cut / "log.jsonl").is_file() and '"train"' in (cut / "log.jsonl").read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert (cut / "last.pt").is_file() and not done(cut)
    assert torchrun(cut, 29565).wait(timeout=300) == 0 and done(cut)  # the requeued job
    a, b = (runs.read_checkpoint(str(d / "last.pt"))["model"] for d in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_tools_mistakes_are_one_line_and_exit_2(micro_root, tmp_path):
    """Where a traceback used to be: bench's numbers, an export to a read-only folder or from a
    run whose config.json is malformed, prediction of a 4-byte TIFF."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def tool(*argv):
        proc = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=ROOT,
            env=env,
            text=True,
            capture_output=True,
            timeout=300,
        )
        return proc.returncode, proc.stderr

    for flag in ("--batch", "--steps"):
        code, err = tool("tools.bench", flag, "0")
        assert code == 2 and flag in err and "Traceback" not in err
    run = tmp_path / "run"
    train.main(micro_args(micro_root, run, "--iters", "1", "--eval-every", "100"))
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        code, err = tool("tools.export", str(run), str(locked / "model"))
        assert os.geteuid() == 0 or (code == 2 and "Traceback" not in err)  # root writes anyway
    finally:
        os.chmod(locked, 0o700)
    (run / "config.json").write_text("{ not json")
    code, err = tool("tools.export", str(run), str(tmp_path / "model"))
    assert code == 2 and "config.json" in err and "Traceback" not in err
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "tiny.tif").write_bytes(b"II*\x00")
    with pytest.raises(SystemExit) as e:
        cli(
            lambda: evaluation.main(
                [
                    str(run / "last.pt"),
                    "--predict",
                    str(tmp_path / "in"),
                    "--out",
                    str(tmp_path / "masks"),
                ]
            )
        )
    assert e.value.code == 2
