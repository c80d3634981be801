"""Using a trained PTB model: `distrnn.ptb.score`, `generate` and `export`, run as a user runs them, on a
model trained with its layers on two devices and read back in processes that have one."""
import json
import os
import subprocess
import sys

import pytest

from conftest import assert_one_line, run_module, subprocess_env, write_corpus
from distrnn.config import override
from distrnn.ptb.configs import PRESETS
from distrnn.ptb import job as ptb_job
from distrnn.ptb.configs import RunOptions

CONFIG = {"hidden_size": "16", "num_steps": "5", "batch_size": "6", "num_layers": "2", "max_max_epoch": "2",
          "max_epoch": "1", "max_grad_norm": "5"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of two epochs with its two layers on two devices: (save path, data dir, its metrics)."""
    root = tmp_path_factory.mktemp("use")
    data = write_corpus(root / "data")
    save = str(root / "run")
    metrics = ptb_job.run(override(PRESETS.get("test"), CONFIG),
                                 RunOptions(data_path=data, save_path=save, devices="/cpu:0,/cpu:1"))
    assert metrics["placement"]["devices"] == ["/device:CPU:0", "/device:CPU:1"]
    return save, data, metrics


def score(*args, check=0):
    return run_module("distrnn.ptb.score", *args, check=check)


def test_score_reproduces_the_test_perplexity_of_the_run(trained, tmp_path):
    save, data, metrics = trained
    test_file = os.path.join(data, "ptb.test.txt")
    for checkpoint, reported in (("last", metrics["test_perplexity"]), ("best", metrics["best_test_perplexity"])):
        out = tmp_path / f"{checkpoint}.json"
        proc = score("--save_path", save, test_file, "--checkpoint", checkpoint, "--metrics_json", out,
                     "--per_line", tmp_path / f"{checkpoint}.jsonl")
        figures = json.loads(out.read_text())
        assert figures["perplexity"] == pytest.approx(reported, rel=1e-5), checkpoint
        assert f"perplexity {figures['perplexity']:.4f}" in proc.stdout
    lines = [json.loads(line) for line in (tmp_path / "last.jsonl").read_text().splitlines()]
    with open(test_file) as f:
        text = f.read().splitlines()
    assert len(lines) == len(text) and [line["words"] for line in lines] == [len(t.split()) + 1 for t in text]
    last = json.loads((tmp_path / "last.json").read_text())
    assert sum(line["log_prob"] for line in lines) == pytest.approx(last["log_prob"], rel=1e-9)
    assert last["words"] == sum(line["words"] for line in lines) and last["files"][test_file]["oov"] == 0


def test_score_counts_unknown_words_and_scores_several_files(trained, tmp_path):
    save, data, _ = trained
    strange = tmp_path / "strange.txt"
    strange.write_text("w1 w2 qqq w3\nzzz w0\n")
    out = tmp_path / "m.json"
    proc = score("--save_path", save, strange, os.path.join(data, "ptb.valid.txt"), "--metrics_json", out)
    figures = json.loads(out.read_text())
    assert figures["files"][str(strange)]["oov"] == 2 and figures["files"][str(strange)]["words"] == 8
    assert "2 read as <unk>" in proc.stdout and "all 2 files" in proc.stdout


def test_the_export_loads_where_distrnn_cannot_be_imported(trained, tmp_path):
    save, data, _ = trained
    export_dir = tmp_path / "model"
    run_module("distrnn.ptb.export", "--save_path", save, "--export_dir", export_dir, check=0)
    score("--save_path", save, os.path.join(data, "ptb.test.txt"), "--metrics_json", tmp_path / "s.json")
    expected = json.loads((tmp_path / "s.json").read_text())["perplexity"]
    batch = json.loads(open(os.path.join(save, "config.json")).read())["global_batch_size"]
    script = f"""
import math, sys
sys.modules["distrnn"] = None  # no distrnn in this process
try:
    import distrnn
    sys.exit("distrnn imported")
except ImportError:
    pass
import numpy as np, tensorflow as tf
model = tf.saved_model.load({str(export_dir)!r})
words = open(model.vocabulary.asset_path.numpy().decode()).read().split()
vocab = {{w: i for i, w in enumerate(words)}}
text = open({os.path.join(data, "ptb.test.txt")!r}).read().replace("\\n", " <eos> ").split()
ids = [vocab.get(w, vocab["<unk>"]) for w in text]
stream, rows = [vocab["<eos>"]] + ids, {batch}
length = -(-len(ids) // rows)
state = model.initial_state(tf.constant(rows))["state"]
x = np.zeros((rows, length), np.int32); y = np.zeros((rows, length), np.int32); w = np.zeros((rows, length))
for r in range(rows):
    lo, hi = r * length, min((r + 1) * length, len(ids))
    if lo < hi:
        x[r, :hi - lo], y[r, :hi - lo], w[r, :hi - lo] = stream[lo:hi], stream[lo + 1:hi + 1], 1
total = 0.0
for start in range(0, length, 5):
    out = model.step(tf.constant(x[:, start:start + 5]), state)
    state, log_probs = out["state"], out["log_probs"].numpy()
    picked = np.take_along_axis(log_probs, y[:, start:start + 5, None], 2)[..., 0]
    total += float((picked * w[:, start:start + 5]).sum())
print(math.exp(-total / len(ids)))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split()[-1]) == pytest.approx(expected, rel=1e-5)


def test_generate_samples_sentences_reproducibly(trained):
    save, _, _ = trained

    def generate(*args, check=0):
        return run_module("distrnn.ptb.generate", "--save_path", save, *args, check=check)

    first = generate("--words", "40", "--seed", "5", "--prompt", "w1 w2 nowhere")
    assert first.stdout == generate("--words", "40", "--seed", "5", "--prompt", "w1 w2 nowhere").stdout
    assert first.stdout != generate("--words", "40", "--seed", "5", "--prompt", "w1 w2 nowhere",
                                    "--temperature", "1.3").stdout
    assert "read as <unk>: nowhere" in first.stderr
    words = first.stdout.split()
    assert words[:3] == ["w1", "w2", "<unk>"] and "<eos>" not in words
    assert len(words) + first.stdout.count("\n") - 1 == 3 + 40  # every drawn word, <eos> as a line's end
    proc = generate("--prompt", "nowhere elsewhere", check=None)
    assert_one_line(proc, "distrnn.ptb.generate", 2, "every word of --prompt is outside the run's vocabulary")
    for flag, value in (("--temperature", "0"), ("--temperature", "-1"), ("--words", "0"), ("--temperature", "nan")):
        proc = generate(flag, value, check=None)
        assert_one_line(proc, "distrnn.ptb.generate", 2, flag)


def test_bad_runs_and_files_are_refused_in_one_line(trained, tmp_path, images):
    save, data, _ = trained
    test_file = os.path.join(data, "ptb.test.txt")
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("\n\n")
    binary.write_bytes(b"\x00\xff\xfe\x01 data")
    for path, fragment in ((empty, "is empty"), (binary, "is not UTF-8 text"), (tmp_path, "is a directory")):
        assert_one_line(score("--save_path", save, path, check=None), "distrnn.ptb.score", 2, str(path), fragment)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert_one_line(score("--save_path", fresh, test_file, check=None), "distrnn.ptb.score", 2, "no config.json")
    (fresh / "config.json").write_text(open(os.path.join(save, "config.json")).read())
    assert_one_line(score("--save_path", fresh, test_file, check=None), "distrnn.ptb.score", 2, "vocab.txt is missing")
    mnist = tmp_path / "mnist"
    run_module("distrnn.mnist", "--config", "test", "--data_path", images, "--save_path", mnist, "--max_steps", "2",
               check=0)
    assert_one_line(score("--save_path", mnist, test_file, check=None), "distrnn.ptb.score", 2, "is not a PTB run")
    # A run from before vocab.txt: its vocabulary rebuilt (in memory: a run's files are its own) from the data
    # it trained on.
    old = tmp_path / "old"
    subprocess.run(["cp", "-r", save, old], check=True)
    os.remove(old / "vocab.txt")
    assert_one_line(score("--save_path", old, test_file, check=None), "distrnn.ptb.score", 2,
                    "pass --data_path DIR, the data the run trained on, to rebuild it")
    rebuilt = score("--save_path", old, test_file, "--data_path", data)
    assert rebuilt.stdout == score("--save_path", save, test_file).stdout.replace(save, str(old))
    assert not (old / "vocab.txt").exists()
    # An export never replaces what is in its directory.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "saved_model.pb").write_bytes(b"a model")
    proc = run_module("distrnn.ptb.export", "--save_path", save, "--export_dir", taken)
    assert_one_line(proc, "distrnn.ptb.export", 2, "already exists and is not an empty directory")
    assert os.listdir(taken) == ["saved_model.pb"] and (taken / "saved_model.pb").read_bytes() == b"a model"
    no_best = tmp_path / "no_best"
    subprocess.run(["cp", "-r", save, no_best], check=True)
    subprocess.run(["rm", "-r", no_best / "best"], check=True)
    assert_one_line(score("--save_path", no_best, test_file, "--checkpoint", "best", check=None),
                    "distrnn.ptb.score", 2, "no checkpoint in", "--checkpoint last")


def test_the_three_commands_need_no_horovod(trained, tmp_path, monkeypatch):
    save, data, metrics = trained
    shadow = tmp_path / "shadow" / "horovod"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('horovod hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "s.json"
    score("--save_path", save, os.path.join(data, "ptb.test.txt"), "--metrics_json", out)
    assert json.loads(out.read_text())["perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-5)
    assert run_module("distrnn.ptb.generate", "--save_path", save, "--words", "5", "--seed", "1", check=0).stdout
    run_module("distrnn.ptb.export", "--save_path", save, "--export_dir", tmp_path / "model", check=0)
    assert (tmp_path / "model" / "saved_model.pb").is_file()
