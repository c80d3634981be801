"""The best epoch's checkpoint, early stopping, the saved vocabulary and tied embeddings (PTB), with the
same rules for MNIST's best epoch by validation accuracy."""
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_one_line, run_ptb
from distrnn.config import override
from distrnn.errors import UsageError
from distrnn.numerics.ops import softmax_cross_entropy
from distrnn.parallel import OneProcess
from distrnn.ptb import reader
from distrnn.ptb.configs import PRESETS
from distrnn.ptb import job as ptb_job
from distrnn.ptb.configs import RunOptions
from distrnn.ptb.trainer import Trainer, evaluate

# Enough units for the synthetic corpus to be overfitted within six epochs: the validation perplexity
# falls, then rises (24.9 at epoch 4, 27.1 at 5 here), so the best epoch is not the last.
OVERFITS = {"hidden_size": "64", "num_steps": "5", "batch_size": "10", "max_max_epoch": "6", "max_epoch": "6",
            "max_grad_norm": "5"}


def ckpt_numbers(directory):
    return sorted(int(n[5:-6]) for n in os.listdir(directory) if n.startswith("ckpt-") and n.endswith(".index"))


def test_best_checkpoint_and_early_stopping(corpus, tmp_path):
    config = override(PRESETS.get("test"), OVERFITS)
    full = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "full")))
    valid = [h["valid_perplexity"] for h in full["history"]]
    best = int(np.argmin(valid))
    assert best < len(valid) - 1, "the corpus no longer overfits: the test needs a best epoch before the last"
    assert (full["best_epoch"], full["best_valid_perplexity"]) == (best + 1, valid[best])
    assert full["stopped_early"] is False and full["best_test_perplexity"] != full["test_perplexity"]
    steps = full["steps_per_epoch"]
    assert ckpt_numbers(tmp_path / "full" / "best") == [(best + 1) * steps]  # one kept, out of the rotation
    assert ckpt_numbers(tmp_path / "full" / "checkpoints")[-1] == len(valid) * steps

    # The best checkpoint holds the best epoch's weights: evaluated afresh, the figure the run reported.
    data = reader.load(corpus)
    trainer = Trainer(config, data.vocab_size, seed=1)
    path = tf.train.latest_checkpoint(str(tmp_path / "full" / "best"))
    tf.train.Checkpoint(model=trainer.model).restore(path).expect_partial()
    batches = reader.rank_batches(data, 10, 5, OneProcess(), "batch 10")
    assert evaluate(trainer, batches.test, OneProcess()) == full["best_test_perplexity"]

    early = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "early"),
                                                  early_stopping=1))
    assert early["stopped_early"] is True and early["history"] == full["history"][:best + 2]
    assert (early["best_epoch"], early["best_test_perplexity"]) == (best + 1, full["best_test_perplexity"])
    # Patience is read from the history: resuming a run that stopped early trains nothing more.
    again = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "early"),
                                                  early_stopping=1, resume=True))
    assert again["steps"] == early["steps"] and again["best_test_perplexity"] == full["best_test_perplexity"]


def test_a_run_saves_its_vocabulary_and_refuses_a_wrong_one(corpus, tmp_path):
    save = tmp_path / "run"
    ptb_job.run(PRESETS.get("test"), RunOptions(data_path=corpus, save_path=str(save), max_steps=3))
    vocab = reader.load(corpus).vocab
    lines = (save / "vocab.txt").read_text().splitlines()
    assert lines == sorted(vocab, key=vocab.get) and reader.read_vocab(str(save), len(vocab)) == vocab
    for text, problem in ((("\n".join(lines[:-1]) + "\n"), f"it has {len(lines) - 1} words, the model {len(lines)}"),
                          ("\n".join(lines[:-1] + [lines[0]]) + "\n", "a word appears twice"),
                          ("\n".join(lines[:-1] + ["two words"]) + "\n", "a line is empty or holds a space")):
        (save / "vocab.txt").write_text(text)
        with pytest.raises(UsageError, match=f"is not this run's vocabulary \\({problem}\\); pass --data_path DIR"):
            reader.read_vocab(str(save), len(vocab))
    (save / "vocab.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        reader.read_vocab(str(save), len(vocab))
    os.remove(save / "vocab.txt")
    with pytest.raises(UsageError, match="vocab.txt is missing; pass --data_path DIR, the data the run trained on"):
        reader.read_vocab(str(save), len(vocab))


def test_tied_softmax_equals_the_untied_one_on_the_same_weights():
    rng = np.random.default_rng(3)
    features = tf.constant(rng.normal(size=(6, 4)), tf.float32)
    rows = tf.constant(rng.normal(size=(9, 4)), tf.float32)  # (V, H): an embedding
    bias, labels = tf.constant(rng.normal(size=(9,)), tf.float32), tf.constant([0, 3, 8, 3, 1, 5])

    def run(weights, class_rows):
        with tf.GradientTape() as tape:
            tape.watch([features, weights, bias])
            loss = softmax_cross_entropy(features, weights, bias, labels, class_rows=class_rows) * tf.range(1.0, 7.0)
        return [loss] + tape.gradient(loss, [features, weights, bias])

    tied, untied = run(rows, True), run(tf.transpose(rows), False)
    untied[2] = tf.transpose(untied[2])
    for a, b in zip(tied, untied):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)


def test_tied_embeddings_train_and_refuse_an_untied_checkpoint(corpus, tmp_path):
    tied = override(PRESETS.get("test"), {"hidden_size": "16", "tie_embeddings": "true", "max_grad_norm": "5"})
    trainer = Trainer(tied, vocab_size=30, seed=0)
    assert not hasattr(trainer.model, "softmax_w")
    untied = Trainer(PRESETS.get("test"), 30, 0)
    assert len(trainer.model.trainable_variables) == len(untied.model.trainable_variables) - 1
    m = ptb_job.run(tied, RunOptions(data_path=corpus, save_path=str(tmp_path / "tied"), max_steps=80))
    assert m["config"]["tie_embeddings"] is True and m["test_perplexity"] < 0.8 * reader.load(corpus).vocab_size
    run_ptb("--config", "test", "--data_path", corpus, "--save_path", str(tmp_path / "untied"), "--max_steps", "2",
            check=0)
    proc = run_ptb("--config", "test", "--data_path", corpus, "--save_path", str(tmp_path / "untied"), "--max_steps",
                   "4", "--resume", "--tie_embeddings", "true")
    assert_one_line(proc, "distrnn.ptb", 2, "from another config (tie_embeddings=False there, True here)")


def test_a_best_checkpoint_alone_is_not_overwritten_by_a_new_run(corpus, tmp_path):
    save = tmp_path / "run"
    run_ptb("--config", "test", "--data_path", corpus, "--save_path", str(save), "--max_epochs", "1", check=0)
    for name in os.listdir(save / "checkpoints"):
        os.remove(save / "checkpoints" / name)
    before = {n: (save / "best" / n).read_bytes() for n in os.listdir(save / "best")}
    proc = run_ptb("--config", "test", "--data_path", corpus, "--save_path", str(save), "--max_steps", "2")
    assert_one_line(proc, "distrnn.ptb", 2, "--save_path holds a best checkpoint", "choose another --save_path")
    assert {n: (save / "best" / n).read_bytes() for n in os.listdir(save / "best")} == before


def test_mnist_keeps_its_best_epoch_by_validation_accuracy(images, tmp_path):
    from distrnn.mnist.configs import PRESETS as MNIST
    from distrnn.mnist.configs import RunOptions as MNISTOptions
    from distrnn.mnist.job import run as train_mnist
    config = override(MNIST.get("test"), {"num_epochs": "3", "validation_size": "100"})
    m = train_mnist(config, MNISTOptions(data_path=images, save_path=str(tmp_path / "m")))
    accuracy = [h["valid_accuracy"] for h in m["history"]]
    best = max(range(len(accuracy)), key=lambda i: (accuracy[i], -i))
    assert (m["best_epoch"], m["best_valid_accuracy"]) == (best + 1, accuracy[best])
    assert set(m) >= {"best_test_accuracy", "best_test_loss", "stopped_early"}
    if best == len(accuracy) - 1:
        assert (m["best_test_accuracy"], m["best_test_loss"]) == (m["test_accuracy"], m["test_loss"])
    assert ckpt_numbers(tmp_path / "m" / "best") == [(best + 1) * m["steps_per_epoch"]]
