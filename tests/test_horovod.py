"""Data parallelism under a real `horovodrun --gloo -np 2 -H localhost:2`."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, run_ptb

HOROVODRUN = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or shutil.which("horovodrun")


ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def horovodrun_command(np_, *args, command=None):
    """`horovodrun --gloo -np N -H localhost:N python -m distrnn.ptb ARGS` (or `command`)."""
    if HOROVODRUN is None:
        pytest.skip("horovodrun not found: Horovod is not installed (bash launch/setup.sh installs it)")
    command = command or [sys.executable, "-m", "distrnn.ptb", *map(str, args)]
    return [HOROVODRUN, "--gloo", "-np", str(np_), "-H", f"localhost:{np_}", *command]


def horovodrun(np_, *args, timeout=300, check=True, command=None):
    proc = subprocess.run(horovodrun_command(np_, *args, command=command), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def weights(save_path):
    reader = tf.train.load_checkpoint(os.path.join(save_path, "checkpoints"))
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith("model/") and "OPTIMIZER" not in n]
    return {n: reader.get_tensor(n) for n in names}


@pytest.mark.parametrize("split", [["--batch_size", "2"], ["--global_batch_size", "4", "--sparse_as_dense"]],
                         ids=["batch_per_rank", "global_batch_dense_embedding"])
def test_two_ranks_equal_one_process_with_twice_the_batch(corpus, tmp_path, split):
    common = ["--config", "test", "--hidden_size", "8", "--num_layers", "2", "--num_steps", "5",
              "--max_max_epoch", "3", "--max_epoch", "1", "--keep_prob", "1.0", "--max_grad_norm", "5",
              "--data_path", corpus, "--seed", "3"]
    proc = horovodrun(2, *common, *split, "--save_path", tmp_path / "two",
                      "--metrics_json", tmp_path / "two.json")
    run_ptb(*common, "--batch_size", "4", "--save_path", tmp_path / "one", "--metrics_json", tmp_path / "one.json",
            check=0)
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["global_batch_size"] == one["global_batch_size"] == 4
    assert two["steps"] == one["steps"] > 0
    assert len(two["words_per_sec_per_rank"]) == 2
    # Every epoch's train and valid perplexity, and the test perplexity at the end (float32 sums
    # in another order: agreement to 1e-5).
    for a, b in zip(two["history"], one["history"]):
        assert a["train_perplexity"] == pytest.approx(b["train_perplexity"], rel=1e-5)
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-5)
    assert two["test_perplexity"] == pytest.approx(one["test_perplexity"], rel=1e-5)
    w2, w1 = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert w2.keys() == w1.keys() and len(w1) >= 4
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # Only rank 0 prints progress and writes files.
    assert proc.stdout.count("done:") == 1


def test_resume_under_two_ranks_continues_exactly(corpus, tmp_path):
    """Rank 0 restores; weights, optimizer, position and every rank's carried LSTM state reach all ranks."""
    common = ["--config", "test", "--hidden_size", "8", "--num_steps", "5", "--batch_size", "2", "--keep_prob", "0.8",
              "--max_grad_norm", "5", "--data_path", corpus, "--checkpoint_every", "1000"]
    horovodrun(2, *common, "--max_steps", "14", "--save_path", tmp_path / "a", "--metrics_json", tmp_path / "a.json")
    horovodrun(2, *common, "--max_steps", "6", "--save_path", tmp_path / "b")
    proc = horovodrun(2, *common, "--max_steps", "14", "--save_path", tmp_path / "b", "--resume",
                      "--metrics_json", tmp_path / "b.json")
    assert "resumed from" in proc.stdout and "ckpt-6" in proc.stdout
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert a["steps"] == b["steps"] == 14
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


def test_bad_splits_and_mismatched_ranks_fail_fast(corpus, tmp_path):
    """Clear errors on every rank, and no rank left waiting."""
    base = ["--config", "test", "--data_path", corpus, "--max_steps", "3"]
    proc = horovodrun(2, *base, "--global_batch_size", "3", "--save_path", tmp_path / "a", check=False, timeout=120)
    assert proc.returncode != 0
    assert "--global_batch_size 3 cannot be split evenly over 2 ranks; use a multiple of 2" in proc.stderr
    # horovodrun prints its own traceback when a rank exits non-zero; the ranks print none.
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[") and "Traceback" in line]
    # Rank 1 started with another hidden size: refused before any training step.
    args = " ".join(map(str, base + ["--save_path", tmp_path / "b"]))
    script = (f'extra=""; [ "$HOROVOD_RANK" = 1 ] && extra="--hidden_size 9"; '
              f'exec {sys.executable} -m distrnn.ptb {args} $extra')
    proc = horovodrun(2, command=["bash", "-c", script], check=False, timeout=120)
    assert proc.returncode != 0
    assert "1 of 2 ranks started with a config or flags different from rank 0's" in proc.stderr
    assert "done:" not in proc.stdout


def test_sigterm_to_horovodrun_checkpoints_and_resumes(corpus, tmp_path):
    """A scheduler's SIGTERM reaches every rank through horovodrun; the ranks agree on the step,
    rank 0 saves, and --resume continues as the uninterrupted run."""
    common = ["--config", "test", "--hidden_size", "8", "--num_steps", "3", "--batch_size", "2",
              "--max_max_epoch", "20", "--data_path", corpus, "--max_steps", "1200", "--checkpoint_every", "100000"]
    horovodrun(2, *common, "--save_path", tmp_path / "a", "--metrics_json", tmp_path / "a.json")

    proc = subprocess.Popen(horovodrun_command(2, *common, "--save_path", tmp_path / "b"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "words/sec" in line:
                break
        proc.send_signal(signal.SIGTERM)
        output = proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped by signal: checkpoint saved" in output and "Exit code: 143" in output, output[-2000:]
    stopped_at = int(open(tmp_path / "b" / "checkpoints" / "checkpoint").read().split('"')[1].split("-")[-1])
    assert 0 < stopped_at < 1200

    proc = horovodrun(2, *common, "--save_path", tmp_path / "b", "--resume", "--metrics_json", tmp_path / "b.json")
    assert f"ckpt-{stopped_at}" in proc.stdout
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert a["steps"] == b["steps"] == 1200
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
