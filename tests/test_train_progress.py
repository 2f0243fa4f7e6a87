"""Console progress of a training step: plain lines without a terminal (one summary per epoch, no
carriage returns or ANSI codes), a tqdm bar with it/s and the loss when forced, FUSIONNET_PROGRESS
checked, other DDP ranks silent, and PrintLogger leaving per-iteration lines to the progress display."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys

import pytest
import yaml

from fusionnet.train.config import StepConfig
from fusionnet.train.loop import run_step
from fusionnet.train.progress import ENV, StepProgress, resolve_mode
from fusionnet.train.toy import write_toy_shards
from fusionnet.train.tracking import PrintLogger
from tests.support.helpers import ROOT, tiny_train_params

SUMMARY = re.compile(r"^\[segmentation\] epoch (\d+)/(\d+) done: mean loss (\S+), val SAD (\S+), "
                     r"(\S+) s \+ val (\S+) s, (\d+) it, (\S+) it/s$")


def tiny_params(epochs: int) -> dict:
    """Narrow heads (fast), 2 iterations an epoch, one val image, no visuals, no checkpoint mid-step."""
    return tiny_train_params(epochs=epochs, narrow=True, checkpoint_every=50)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("toy") / "shards", n_train=4, n_val=1, size=32)


def test_plain_mode_without_a_terminal_prints_one_summary_per_epoch(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)  # auto: pytest's captured stderr is no terminal
    result = run_step("segmentation", StepConfig.from_params(tiny_params(epochs=2), "segmentation"), shards, tmp_path / "seg")
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = [line for line in err.splitlines() if line.startswith("[segmentation]")]
    matches = [SUMMARY.match(line) for line in lines]
    assert all(matches), lines  # 2 iterations an epoch: no line in between, only the summaries
    history = json.loads((tmp_path / "seg" / "history.json").read_text())["epochs"]
    assert [(int(m[1]), int(m[2])) for m in matches] == [(1, 2), (2, 2)]
    for m, row in zip(matches, history):
        assert float(m[3]) == pytest.approx(row["train_loss"], rel=1e-3)
        assert float(m[4]) == pytest.approx(row["val_sad"], rel=1e-3)
        assert float(m[5]) == pytest.approx(row["epoch_s"], abs=0.06)
        assert int(m[7]) == 2 and float(m[8]) == pytest.approx(2 / row["epoch_s"], abs=0.006)
    assert result.iterations == 4


def test_bar_mode_draws_a_tqdm_bar_with_rate_and_loss(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV, "bar")
    run_step("segmentation", StepConfig.from_params(tiny_params(epochs=1), "segmentation"), shards, tmp_path / "seg")
    err = capsys.readouterr().err
    assert "\r" in err  # tqdm redraws in place
    final = err.split("\r")[-1].splitlines()[0]  # the bar as it was left when closed
    assert re.search(r"segmentation epoch 1/1: 100%\|.*\| 2/2 \[\d\d:\d\d<00:00, \s*\d+\.\d\dit/s, "
                     r"loss=\d\S*, lr=\d\.\d\de-0\d\]", final), final
    assert re.search(r"^\[segmentation\] epoch 1/1 done: mean loss ", err, re.M)


def test_off_mode_prints_nothing_but_the_step_still_trains(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV, "off")
    result = run_step("segmentation", StepConfig.from_params(tiny_params(epochs=1), "segmentation"), shards, tmp_path / "seg")
    assert capsys.readouterr().err == "" and result.iterations == 2


DRIVER = """
import sys
from pathlib import Path
import yaml
from fusionnet.train.config import StepConfig
from fusionnet.train.loop import run_step
params, shards, out = sys.argv[1:4]
run_step("segmentation", StepConfig.from_params(yaml.safe_load(open(params)), "segmentation"), Path(shards), Path(out))
"""


@pytest.mark.slow
def test_under_ddp_only_rank_0_shows_progress(shards, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(epochs=1)))
    (tmp_path / "driver.py").write_text(DRIVER)
    logs = tmp_path / "logs"  # torchrun's --redirects: each rank's stdout and stderr in its own file
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs),
           "--redirects", "3", str(tmp_path / "driver.py"), str(tmp_path / "params.yaml"), str(shards), str(tmp_path / "seg")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", ENV: "bar"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (err0,) = logs.glob("**/0/stderr.log")
    (err1,) = logs.glob("**/1/stderr.log")
    (out1,) = logs.glob("**/1/stdout.log")
    assert re.search(r"segmentation epoch 1/1: 100%.*it/s, loss=", err0.read_text())
    assert "[segmentation] epoch 1/1 done" in err0.read_text()
    assert err1.read_text() == "" and out1.read_text() == ""


def test_a_bad_progress_mode_is_refused_before_any_work(shards, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "fancy")
    with pytest.raises(ValueError, match=r"FUSIONNET_PROGRESS='fancy': choose one of auto, bar, plain, off"):
        run_step("segmentation", StepConfig.from_params(tiny_params(epochs=1), "segmentation"), shards, tmp_path / "seg")
    assert not (tmp_path / "seg").exists()


def test_bar_shows_on_a_terminal_that_reports_no_size():
    master, slave = os.openpty()  # a fresh pty reports 0x0, as under `script` or in some CI runners
    try:
        with open(slave, "w", closefd=True) as tty:
            progress = StepProgress("joint", mode="auto", stream=tty)
            with progress.epoch(1, 1, total=2) as shown:
                shown.update(0.5, 1e-3)
                shown.update(0.25, 1e-3)
            tty.flush()
        out = b""
        while select.select([master], [], [], 1.0)[0]:  # the pty hands the output over in pieces
            try:
                out += os.read(master, 65536)
            except OSError:  # EIO: the writing end is closed and everything was read
                break
    finally:
        os.close(master)
    out = out.decode()
    assert progress.mode == "bar"
    assert re.search(r"joint epoch 1/1: 100%\|.+\| 2/2 .*it/s, loss=0\.25, lr=1\.00e-03\]", out), out


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds_per_it, expected_at", [
    (1.0, [30, 60, 90]),          # a 100 s epoch: 30 s is rarer than 10%
    (10.0, list(range(10, 100, 10))),  # a 1000 s epoch: 10% (100 s) is rarer than 30 s
    (0.1, []),                    # a 10 s epoch: only the summary line
])
def test_plain_lines_come_at_the_rarer_of_ten_percent_and_thirty_seconds(seconds_per_it, expected_at):
    clock, stream = FakeClock(), io.StringIO()
    progress = StepProgress("fusion", mode="plain", stream=stream, clock=clock)
    with progress.epoch(3, 5, total=100) as shown:
        for _ in range(100):
            clock.now += seconds_per_it
            shown.update(0.25, 1e-3)
    lines = stream.getvalue().splitlines()
    assert [int(re.search(r": (\d+)/100 it", line)[1]) for line in lines] == expected_at
    if seconds_per_it == 1.0:
        assert lines[0] == "[fusion] epoch 3/5: 30/100 it (30%), 1.00 it/s, ETA 1m10s, loss 0.25, lr 1.00e-03"


def test_plain_rate_and_eta_count_only_this_run_after_a_resume():
    clock, stream = FakeClock(), io.StringIO()
    progress = StepProgress("joint", mode="plain", stream=stream, clock=clock, every_s=0, every_fraction=0.25)
    with progress.epoch(1, 1, total=200, done=100) as shown:  # 100 iterations done before the resume
        for _ in range(50):
            clock.now += 2.0
            shown.update(0.5, 1e-3)
    assert stream.getvalue() == "[joint] epoch 1/1: 150/200 it (75%), 0.50 it/s, ETA 1m40s, loss 0.5, lr 1.00e-03\n"


@pytest.mark.parametrize("is_main, mode", [(False, "bar"), (False, "plain"), (True, "off")])
def test_off_and_other_ranks_print_nothing(is_main, mode):
    stream = io.StringIO()  # every_s=0, every_fraction=0: a plain line after every iteration, were any printed
    progress = StepProgress("joint", is_main=is_main, mode=mode, stream=stream, every_s=0, every_fraction=0)
    with progress.epoch(1, 1, total=4) as shown:
        for _ in range(4):
            shown.update(0.5, 1e-3)
    progress.summary(1, 1, 0.5, 12.0, 3.0, 1.0, 4)
    progress.write("a line")
    assert progress.mode == "off" and stream.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_mode_follows_the_terminal():
    assert resolve_mode(None, Terminal()) == "bar" and resolve_mode("auto", Terminal()) == "bar"
    assert resolve_mode("", io.StringIO()) == "plain"
    assert resolve_mode(" Plain ", Terminal()) == "plain" and resolve_mode("off", Terminal()) == "off"


def test_print_logger_leaves_iteration_lines_to_the_progress_display():
    quiet, full = io.StringIO(), io.StringIO()
    for stream, logger in ((quiet, PrintLogger(quiet)), (full, PrintLogger(full, iterations=True))):
        logger.log_metrics({"train/loss": 0.5, "train/lr": 1e-3}, step=10)
        logger.log_metrics({"val/sad": 12.5, "val/mse": 0.01}, step=10)
    assert quiet.getvalue() == "[10] val/sad=12.5 val/mse=0.01\n"
    assert full.getvalue() == "[10] train/loss=0.5 train/lr=0.001\n[10] val/sad=12.5 val/mse=0.01\n"
