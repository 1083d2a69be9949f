"""gradcomp-launch's routing of Ray's output, without starting Ray: a worker's progress bar
reaches the terminal as one redrawn line, everything else (Ray Train's report lines, controller
messages, the driver's ``ray`` loggers) goes to the run's log file.

The end-to-end check (a real embedded-Ray run prints no report lines) is in
``tests/ray/test_launch.py::test_embedded_ray_st_prune_fp``.
"""

import io
import logging
from contextlib import redirect_stdout

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")
tqdm = pytest.importorskip("tqdm", reason="the train extra is not installed").tqdm

from gradcomp.app.launch import _RayOutput  # noqa: E402
from gradcomp.app.ray_worker import PROGRESS_MARK, _ProgressRelay  # noqa: E402

REPORT = ("Reporting training result 1: TrainingReport(checkpoint=None, metrics={'gradcomp_result_json': "
          "'{\"history\": [1, 2, 3]}'}, validation=False) from rank 0")


def _relayed_bar(steps: int) -> list[str]:
    """The stdout lines a worker's tqdm bar produces through :class:`_ProgressRelay`."""
    out = io.StringIO()
    with redirect_stdout(out):
        bar = tqdm(total=steps, desc="resnet1d/prune-fp", unit="step", mininterval=0.0, file=_ProgressRelay())
        for _ in range(steps):
            bar.update(1)
            bar.set_postfix(loss="2.000", refresh=False)
        bar.close()
    return out.getvalue().splitlines()


def test_relay_marks_every_line_and_ends_with_close():
    lines = _relayed_bar(4)
    assert lines and all(line.startswith(PROGRESS_MARK) for line in lines)
    assert lines[-1] == PROGRESS_MARK + "null"  # the bar was closed
    assert "4/4" in lines[-2] and "loss=2.000" in lines[-2]


def test_worker_output_goes_to_the_log_and_only_the_bar_to_the_terminal(tmp_path):
    terminal = io.StringIO()
    log = tmp_path / "ray.log"
    batch = {"pid": 123, "ip": "127.0.0.1", "actor_name": "RayTrainWorker",
             "lines": ["Checkpoint successfully created at: Checkpoint(...)", REPORT, *_relayed_bar(3)]}
    with _RayOutput(log, terminal=terminal) as routed:
        routed.handle(batch)
        routed.handle({"pid": 7, "ip": "127.0.0.1", "actor_name": "TrainController",
                       "lines": ["Requesting resources: {'CPU': 1} * 2"]})
        logging.getLogger("ray.train").warning("driver-side ray logger line")
    shown = terminal.getvalue()
    assert "Reporting training result" not in shown and "TrainingReport" not in shown
    assert "Requesting resources" not in shown and "driver-side" not in shown
    assert "(RayTrainWorker" not in shown and PROGRESS_MARK not in shown
    assert "3/3" in shown and shown.endswith("\n")  # the bar, finished on its own line
    text = log.read_text()
    assert f"(RayTrainWorker pid=123, ip=127.0.0.1) {REPORT}" in text
    assert "(TrainController pid=7, ip=127.0.0.1) Requesting resources" in text
    assert "driver-side ray logger line" in text
    assert PROGRESS_MARK not in text


def test_ray_logger_handlers_are_restored(tmp_path):
    ray_logger = logging.getLogger("ray")
    before = list(ray_logger.handlers)
    with _RayOutput(tmp_path / "ray.log", terminal=io.StringIO()):
        assert ray_logger.handlers != before
    assert ray_logger.handlers == before
