"""rlhf_jax.train.progress: whole lines in a redirected log, a live bar on a terminal."""

import io
import subprocess
import sys

from rlhf_jax.train import progress as P


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_lines_first_periodic_and_last():
    clock, out = Clock(), io.StringIO()
    bar = P.Progress(200, desc="sft", stream=out, every_s=10.0, clock=clock)
    for k in range(1, 201):
        clock.now += 0.25  # 4 steps/s
        bar.update(1)
        if k % 20 == 0:
            bar.set_postfix({"loss": 1.0 / k, "note": "warm"})
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # The first update; then a line when 10 s have passed (every 40 steps); the last.
    assert lines[0] == "sft: 1/200 steps (0%), 4 steps/s"
    assert lines[1] == "sft: 41/200 steps (20%), 4 steps/s, loss 0.025, note warm"
    assert [line.split()[1] for line in lines] == ["1/200", "41/200", "81/200", "121/200",
                                                   "161/200", "200/200"]
    assert lines[-1] == "sft: 200/200 steps (100%), 4 steps/s, loss 0.005, note warm"


def test_the_rate_is_that_since_the_previous_line_and_slow_loops_read_in_seconds():
    clock, out = Clock(), io.StringIO()
    bar = P.Progress(10, initial=4, desc="ppo", unit="it", stream=out, every_s=10.0, clock=clock)
    clock.now += 30.0  # the first iteration compiles
    bar.update(1)
    clock.now += 12.5
    bar.update(1)
    clock.now += 2.5
    bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == [
        "ppo: 5/10 its (50%), 30 s/it",  # resumed at 4: the rate counts only this run's work
        "ppo: 6/10 its (60%), 12.5 s/it",
        "ppo: 7/10 its (70%), 2.5 s/it",
    ]


def test_the_last_line_is_not_repeated_and_nothing_is_printed_without_progress():
    clock, out = Clock(), io.StringIO()
    bar = P.Progress(3, stream=out, clock=clock)
    bar.close()
    assert out.getvalue() == ""
    for _ in range(3):
        clock.now += 1.0
        bar.update(1)
    bar.set_postfix({"loss": 0.5})
    bar.close()  # the postfix came after the last line: it is printed once more
    bar.close()
    assert out.getvalue().splitlines() == ["1/3 steps (33%), 1 steps/s",
                                           "3/3 steps (100%), 1 steps/s, loss 0.5"]


def test_the_context_manager_writes_plain_lines_to_a_file_and_the_last_on_exit(tmp_path):
    path = tmp_path / "run.log"
    with open(path, "w") as f:
        with P.progress(50, desc="rm", stream=f, every_s=3600) as bar:
            for _ in range(50):
                bar.update(1)
            bar.set_postfix({"train/loss": 0.25, "eval/accuracy": "n/a"})
    lines = path.read_text().splitlines()
    assert "\r" not in path.read_text()
    assert len(lines) == 2 and lines[0].startswith("rm: 1/50 steps (2%), ")
    assert lines[1].startswith("rm: 50/50 steps (100%), ")
    assert lines[1].endswith(", train/loss 0.25, eval/accuracy n/a")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place():
    out = FakeTerminal()
    with P.progress(5, desc="sft", stream=out) as bar:
        for _ in range(5):
            bar.update(1)
        bar.set_postfix({"loss": 0.123456})
    text = out.getvalue()
    assert "\r" in text and "sft" in text and "5/5" in text and "loss=0.1235" in text


def test_write_prints_a_whole_line_on_standard_output(capsys):
    out = io.StringIO()
    with P.progress(2, stream=out) as bar:
        bar.update(1)
        P.log_line("checkpoint saved at step 1")
        bar.update(1)
    assert capsys.readouterr().out == "checkpoint saved at step 1\n"


def test_redirected_standard_error_of_a_process_has_no_carriage_returns():
    """As a user's `> run.log 2>&1` sees it: the default stream is standard error."""
    code = ("from rlhf_jax.train.progress import progress\n"
            "with progress(30, desc='demo', every_s=0.0) as bar:\n"
            "    for _ in range(30):\n"
            "        bar.update(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 30 and lines[-1].startswith("demo: 30/30 steps (100%)")
