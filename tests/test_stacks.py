"""A run moves between the two stacks CI builds (TensorFlow 2.15.1 with Keras 2 and Horovod, and the newest
TensorFlow with Keras 3, numpy 2): a checkpoint written on one resumes on the other and back, and the run
ends where it ends without the moves. launch/test.sh sets DISTRNN_OTHER_PYTHON to the other stack's python."""
import json
import os
import subprocess
import sys

import pytest

from conftest import run_module, write_corpus, write_images

OTHER = os.environ.get("DISTRNN_OTHER_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not OTHER, reason="DISTRNN_OTHER_PYTHON is not set: launch/test.sh sets it to the "
                                                   "second stack's python (DISTRNN_TF=2.21.0 bash launch/setup.sh)")]
JOBS = {"ptb": (["--config", "test", "--hidden_size", "16", "--batch_size", "4", "--num_steps", "5",
                 "--keep_prob", "0.8"], write_corpus, ("train_perplexity", "valid_perplexity", "test_perplexity")),
        "mnist": (["--config", "test", "--hidden_size", "8", "--validation_size", "100"], write_images,
                  ("train_accuracy", "valid_loss", "valid_accuracy", "test_accuracy", "test_loss"))}


def stack_of(python):
    out = subprocess.run([python, "-m", "distrnn.devices", "--stack", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_checkpoint_moves_to_the_other_stack_and_back(job, tmp_path):
    flags, write_data, keys = JOBS[job]
    this, other = stack_of(sys.executable), stack_of(OTHER)
    assert this["tensorflow"] != other["tensorflow"], (this, other)
    data = write_data(tmp_path / "data")
    common = [*flags, "--data_path", data]

    def run(python, save, steps, *extra):
        metrics = tmp_path / f"{save}-{steps}.json"
        proc = run_module(f"distrnn.{job}", *common, "--save_path", tmp_path / save, "--max_steps", steps,
                          "--metrics_json", metrics, *extra, python=python, check=0)
        return proc, json.loads(metrics.read_text())

    _, straight = run(sys.executable, "straight", 12)
    run(sys.executable, "moved", 4)
    there, middle = run(OTHER, "moved", 8, "--resume")
    back, moved = run(sys.executable, "moved", 12, "--resume")
    assert "resumed from" in there.stdout and "resumed from" in back.stdout
    assert middle["versions"]["tensorflow"] == other["tensorflow"] and moved["versions"]["tensorflow"] == \
        this["tensorflow"] and moved["steps"] == straight["steps"] == 12
    # Four of the twelve steps ran on another TensorFlow, whose kernels may round differently: measured
    # (2.15.1 and 2.21.0, AMD EPYC with AVX-512) MNIST equal to the bit, PTB within 6.4e-8 relative; the
    # bound leaves room for other processors' kernels, far below any change a wrong restore would make.
    for key in keys:
        assert moved[key] == pytest.approx(straight[key], rel=1e-5), key
