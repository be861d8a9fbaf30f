"""Run folders damaged by a kill or a disk fault: `diffllama train --resume` and `diffllama plot` either tolerate
the damage a kill leaves (a metrics line cut short) or stop with one error line naming the file, writing nothing."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from diffllama.cli import app
from diffllama.train.loop import Trainer
from train_utils import micro_config, small_corpus

runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (metrics at every step, validation at 3 and 4)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = micro_config(small_corpus(tmp / "corpus"), tmp / "cache", max_steps=4, save_every=2)
    Trainer(cfg, tmp / "run", quiet=True).fit()
    return tmp / "run"


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to damage."""
    return shutil.copytree(finished, tmp_path / "run")


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_line_cut_short_by_a_kill_is_dropped_with_a_note(run):
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 5, "loss": 6.1')  # a write cut off by SIGKILL
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    assert f"note: the last line of {metrics} (line 7) is cut short (by a run killed while writing it, or one " \
           f"still writing it); it is left out" in result.output
    assert _steps(run) == [1, 2, 3, 3, 4, 4, 5, 6, 6]  # every line is a record again


@pytest.mark.parametrize("damage, message", [
    ("metrics-line", "{run}/metrics.jsonl:2: not JSON (Expecting ',' delimiter: line 1 column 24 (char 23)); fix or "
                     "delete that line"),
    ("metrics-step", "{run}/metrics.jsonl:2: 'step' must be an integer >= 0, it is missing; fix or delete that line"),
    ("trainer-state", "--resume: checkpoint file {ckpt}/trainer_state.pt cannot be read, it is truncated or corrupt "
                      "(ValueError: invalid literal for int() with base 10: 'arbage\\n'); the run's earlier checkpoint "
                      "{run}/checkpoints/step-000002 remains: move {ckpt} out of {run}/checkpoints and --resume "
                      "continues from it"),
    ("rng", "--resume: checkpoint file {ckpt}/rng-rank0.pt cannot be read, it is truncated or corrupt (EOFError: Ran "
            "out of input); the run's earlier checkpoint {run}/checkpoints/step-000002 remains"),
])
def test_damaged_run_file_is_one_error_naming_it_and_nothing_is_written(run, damage, message):
    ckpt = run / "checkpoints" / "step-000004"
    if damage == "metrics-line":
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        lines[1] = '{"step": 2, "loss": 6.1\n'
        (run / "metrics.jsonl").write_text("".join(lines))
    elif damage == "metrics-step":
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "step"}) + "\n"
        (run / "metrics.jsonl").write_text("".join(lines))
    elif damage == "trainer-state":
        (ckpt / "trainer_state.pt").write_text("garbage\n")
    else:
        (ckpt / "rng-rank0.pt").write_bytes(b"")
    before = _snapshot(run)
    # --max-steps 6 would be recorded in config.yaml: the checks come first, so it is not.
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--max-steps", "6"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(run=run, ckpt=ckpt)), result.output
    assert _snapshot(run) == before


def _metrics(folder, lines):
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


GOOD = [json.dumps({"step": 1, "loss": 5.0, "lr": 0.001}), json.dumps({"step": 2, "loss": 4.0, "lr": 0.002}),
        json.dumps({"step": 2, "val_loss": 4.5})]


@pytest.mark.parametrize("out, written", [
    (None, "run/loss.png"), ("myplot", "myplot.png"), ("figures", "figures/loss.png"),
    ("figures/", "figures/loss.png"), ("curves.pdf", "curves.pdf"),
], ids=["default", "no-suffix", "folder", "folder-slash", "pdf"])
def test_plot_prints_the_path_it_wrote(tmp_path, monkeypatch, out, written):
    monkeypatch.chdir(tmp_path)
    _metrics(tmp_path / "run", GOOD)
    (tmp_path / "figures").mkdir()
    result = runner.invoke(app, ["plot", "run", *(["--out", out] if out else [])])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == written
    assert (tmp_path / written).stat().st_size > 1000
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert made == sorted({"run/metrics.jsonl", written})  # nothing else written


@pytest.mark.parametrize("out, message", [
    ("plot.txt", "error: --out 'plot.txt': matplotlib cannot write '.txt' files; expected a .png path (or another "
                 "format matplotlib writes: .pdf, .svg, ...) or a folder"),
    ("missing/plot.png", "error: --out 'missing/plot.png': the folder 'missing' does not exist"),
    ("missing/", "error: --out 'missing/': the folder 'missing' does not exist"),
])
def test_plot_refuses_an_out_it_cannot_write(tmp_path, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    _metrics(tmp_path / "run", GOOD)
    result = runner.invoke(app, ["plot", "run", "--out", out])
    assert result.exit_code == 1 and result.output.strip() == message, result.output
    assert [p.name for p in tmp_path.rglob("*")] == ["run", "metrics.jsonl"]


@pytest.mark.parametrize("bad, message", [
    ('{"step": 3, "loss": "nan?"}', "'loss' must be a number, got 'nan?'"),
    ('{"loss": 3.0}', "'step' must be an integer >= 0, it is missing"),
    ('{"step": "3", "loss": 3.0}', "'step' must be an integer >= 0, got '3'"),
    ('[3, 3.0]', "expected a JSON object with a 'step', got [3, 3.0]"),
    ('{"step": 3, "loss": 3.0', "not JSON (Expecting ',' delimiter: line 1 column 24 (char 23))"),
])
def test_plot_bad_metrics_line_is_one_error_naming_file_and_line(tmp_path, bad, message):
    run = _metrics(tmp_path / "run", [GOOD[0], bad, GOOD[1]])
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == f"error: {run}/metrics.jsonl:2: {message}; fix or delete that line"
    assert not (run / "loss.png").exists()


def test_plot_leaves_out_a_last_line_cut_short(tmp_path):
    run = _metrics(tmp_path / "run", GOOD)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stderr == f"note: the last line of {run}/metrics.jsonl (line 4) is cut short (by a run killed " \
                            f"while writing it, or one still writing it); it is left out\n"
    assert result.stdout == f"{run}/loss.png\n" and (run / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("damage", ["", '{"steps": 4, "tok', '{"steps": 2}'],
                         ids=["empty", "cut-short", "older-step"])
def test_resume_redoes_the_finish_step_when_summary_json_is_not_this_steps(run, damage):
    # the copy's own paths: the fixture's summary names the folder it was written in
    want = {**json.loads((run / "summary.json").read_text()), "model_dir": str(run / "model"),
            "checkpoint": str(run / "checkpoints" / "step-000004")}
    (run / "summary.json").write_text(damage)
    result = runner.invoke(app, ["train", "--out", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text()) == want
    assert "done: 4 steps" in result.output and "nothing to do" not in result.output
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".summary")) == []  # no temp file left


def test_plot_failing_mid_write_keeps_the_previous_image(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run = _metrics(tmp_path / "run", GOOD)
    assert runner.invoke(app, ["plot", str(run)]).exit_code == 0
    before = (run / "loss.png").read_bytes()

    def disk_full(self, target, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        from diffllama.train.plot import plot_run
        plot_run(run)
    assert (run / "loss.png").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "metrics.jsonl"]
