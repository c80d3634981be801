"""What every multi-process engine does, run on each under its own launcher: Horovod (`horovodrun --gloo`)
and TensorFlow's collectives (`python -m distrnn.launch`, each worker with its TF_CONFIG). Gradients sent in
float16, float16 training's loss scale agreed by every rank, a divergence, a memory stop, and the job's
refusals (a batch that does not split, ranks started differently) each behave the same on both."""
import json
import os
import re
import sys

import pytest

from conftest import ENGINES, ROOT, launched, too_high_then_settled, write_corpus
from distrnn.errors import OutOfMemory

PTB_SPLIT = ["--config", "test", "--hidden_size", "8", "--num_layers", "2", "--num_steps", "5", "--max_max_epoch", "3",
             "--max_epoch", "1", "--keep_prob", "1.0", "--max_grad_norm", "5", "--seed", "3"]
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("engine", ENGINES)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 100 steps an epoch of 2 x 2 rows: three epochs (learning-rate decay in two) compare at little cost.
    return write_corpus(tmp_path_factory.mktemp("engines") / "corpus", train_words=2000, other_words=600)


def metrics(path):
    return json.loads(path.read_text())


def test_fp16_allreduce_is_close_to_float32_on_the_wire(engine, corpus, tmp_path):
    """2 ranks sending gradients in float16 (the embedding's rows too) against 2 ranks sending float32:
    float16 rounds each averaged gradient to 2^-11 relative; 300 steps of SGD carried that into the
    perplexities at 8.0e-7 (train), 3.6e-6 (valid), 1.9e-6 (test) relative on Horovod (pytest -s prints
    them), bounded here at 1e-4; not bit-identical, so the rounding happened."""
    common = [*PTB_SPLIT, "--data_path", corpus, "--batch_size", "2"]
    runs = {}
    for name, extra in (("float32", []), ("float16", ["--fp16_allreduce"])):
        launched(engine, 2, *common, *extra, "--save_path", tmp_path / name, "--metrics_json",
                 tmp_path / f"{name}.json")
        runs[name] = metrics(tmp_path / f"{name}.json")
    wire16, wire32 = runs["float16"], runs["float32"]
    assert (wire16["fp16_allreduce"], wire32["fp16_allreduce"]) == (True, False)
    assert (wire16["engine"], wire16["steps"], wire32["steps"]) == (engine, 300, 300)
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        print(f"{engine} --fp16_allreduce {key}: {wire16[key]:.6f} against {wire32[key]:.6f}, relative difference "
              f"{abs(wire16[key] - wire32[key]) / wire32[key]:.2e}")  # pytest -s shows it
        assert wire16[key] == pytest.approx(wire32[key], rel=1e-4), key
    assert wire16["test_perplexity"] != wire32["test_perplexity"]
    ranks = wire16["ranks"]
    assert ranks[0]["weights_norm"] == ranks[1]["weights_norm"]  # both ranks applied the same decoded gradients


def test_an_overflow_runs_the_step_again_on_every_rank(engine, corpus, tmp_path):
    """float16 from a loss scale of 2^40: the averaged gradients overflow on every rank at once, so all
    halve the scale and run the window again together (a rank going on alone would wait for ever in the
    next allreduce), each drawing its dropout masks again; the run is exactly the one that started at
    the scale they came down to (scaling by a power of 2 is exact)."""
    script = os.path.join(ROOT, "tests", "loss_scale_from.py")
    common = [*PTB_SPLIT, "--data_path", corpus, "--batch_size", "2", "--keep_prob", "0.8", "--precision", "float16",
              "--max_steps", "8"]

    def train(name, scale):
        launched(engine, 2, command=[sys.executable, script, scale, *common, "--save_path", tmp_path / name,
                                     "--metrics_json", tmp_path / f"{name}.json"])
        return metrics(tmp_path / f"{name}.json")

    high, low = too_high_then_settled(train)
    assert (high["engine"], high["steps"]) == (engine, 8)
    for key in ("valid_perplexity", "test_perplexity"):
        assert high[key] == low[key], key
    assert high["ranks"][0]["weights_norm"] == high["ranks"][1]["weights_norm"]


def test_bad_splits_mismatched_ranks_and_divergence_stop_every_rank(engine, corpus, tmp_path):
    """Clear errors on every rank, and no rank left waiting."""
    base = ["--config", "test", "--data_path", corpus, "--max_steps", "3"]
    proc = launched(engine, 2, *base, "--global_batch_size", "3", "--save_path", tmp_path / "a", check=None,
                    timeout=120)
    assert proc.returncode != 0
    assert "--global_batch_size 3 cannot be split evenly over 2 ranks; use a multiple of 2" in proc.stderr
    # horovodrun prints its own traceback when a rank exits non-zero; the ranks print none.
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[") and "Traceback" in line]
    if engine == "tensorflow":
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # Rank 1 started with another hidden size: refused before any training step.
    args = " ".join(map(str, base + ["--save_path", tmp_path / "b"]))
    script = (f'extra=""; [[ "${{HOROVOD_RANK:-}}" == 1 || "${{TF_CONFIG:-}}" == *\'"index": 1}}\'* ]] && '
              f'extra="--hidden_size 9"; exec {sys.executable} -m distrnn.ptb {args} $extra')
    proc = launched(engine, 2, command=["bash", "-c", script], check=None, timeout=120)
    assert proc.returncode != 0
    assert "1 of 2 ranks started with a config or flags different from rank 0's" in proc.stderr
    assert "done:" not in proc.stdout
    # A run that diverges stops on every rank at the same step, with nothing of that step saved.
    proc = launched(engine, 2, *base, "--learning_rate", "1e30", "--checkpoint_every", "1", "--save_path",
                    tmp_path / "c", check=None, timeout=120)
    # horovodrun ends the other rank when the first exits, so one line or two; each names step 2.
    diverged = [line for line in proc.stderr.splitlines() if "so training diverged" in line]
    assert proc.returncode != 0 and diverged and "done:" not in proc.stdout, proc.stderr[-3000:]
    if engine == "tensorflow":  # distrnn.launch lets every worker end by itself: both say it
        assert proc.returncode == 65 and len(diverged) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Which figures are inf or nan first depends on the processor's kernels; the perplexity always is.
    assert all("step 2: the " in line and "perplexity is inf" in line for line in diverged), diverged
    assert sorted(n for n in os.listdir(tmp_path / "c" / "checkpoints") if n.endswith(".index")) == ["ckpt-1.index"]


def test_a_memory_stop_is_agreed_by_every_rank_and_resumes(engine, corpus, tmp_path):
    """--mem_stop crossed (any machine running TensorFlow uses more than 0.1% of its memory): every rank stops
    at the same step with one checkpoint and exit 76, and the run resumes on every rank."""
    common = [*PTB_SPLIT, "--data_path", corpus, "--batch_size", "2", "--save_path", tmp_path / "run"]
    proc = launched(engine, 2, *common, "--mem_warn", "0.0005", "--mem_stop", "0.001", check=None)
    # Each rank says it (memory matters wherever it runs short), after the one checkpoint.
    stopped = dict(re.findall(r"rank (\d): (stopped: memory ran short.*)", proc.stdout))
    assert sorted(stopped) == ["0", "1"], f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for line in stopped.values():
        assert "(--mem_stop 0.001)" in line and f"checkpoint saved in {tmp_path / 'run' / 'checkpoints'}" in line
    if engine == "tensorflow":
        assert proc.returncode == OutOfMemory.exit_code == 76 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:  # horovodrun prints a traceback of its own when a rank exits non-zero; the ranks print none
        assert proc.returncode != 0 and re.search(r"Process \d exit with status code 76", proc.stdout + proc.stderr)
        assert not [line for line in proc.stderr.splitlines() if line.startswith("[") and "Traceback" in line]
    launched(engine, 2, *common, "--resume", "--max_steps", "20", "--metrics_json", tmp_path / "m.json")
    resumed = metrics(tmp_path / "m.json")
    assert (resumed["engine"], resumed["steps"], resumed["memory"]["stopped"]) == (engine, 20, None)
