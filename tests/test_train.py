import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from distrnn.config import override
from distrnn.ptb import reader
from distrnn.ptb.configs import PRESETS
from distrnn.ptb import job as ptb_job
from distrnn.ptb.configs import RunOptions
from distrnn.ptb.model import PTBModel
from distrnn.ptb.trainer import Trainer, sum_duplicate_rows
from distrnn.rnn import Unrolling

SMALLISH = {"hidden_size": "16", "num_steps": "5", "batch_size": "4", "num_layers": "2"}


def test_sum_duplicate_rows_gives_the_dense_gradient_norm():
    g = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), tf.constant([2, 0, 2]),
                         tf.constant([4, 2]))
    merged = sum_duplicate_rows(g)
    dense = tf.convert_to_tensor(g)
    np.testing.assert_array_equal(tf.convert_to_tensor(merged).numpy(), dense.numpy())
    assert sorted(merged.indices.numpy().tolist()) == [0, 2]
    assert float(tf.linalg.global_norm([merged])) == pytest.approx(float(tf.norm(dense)))


def test_training_step_lowers_loss_on_a_repeated_batch():
    config = override(PRESETS.get("test"), dict(SMALLISH, max_grad_norm="5"))
    trainer = Trainer(config, vocab_size=30, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, (4, 5)).astype(np.int32)
    y = (x + 1) % 30  # learnable from the current word alone
    state = trainer.model.zero_state(4)
    losses = [float(trainer.train_step(x, y, state)[0]) for _ in range(30)]
    # A fresh model predicts close to uniformly: loss = num_steps * log(V).
    assert losses[0] == pytest.approx(5 * math.log(30), rel=0.02)
    assert losses[-1] < 0.75 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))


def test_dropout_applies_only_in_training():
    config = override(PRESETS.get("test"), dict(SMALLISH, keep_prob="0.5"))
    trainer = Trainer(config, vocab_size=30, seed=0)
    x = np.arange(20, dtype=np.int32).reshape(4, 5)
    state = trainer.model.zero_state(4)
    eval_a, _ = trainer.model(x, state, training=False)
    eval_b, _ = trainer.model(x, state, training=False)
    train_a, _ = trainer.model(x, state, training=True)
    np.testing.assert_array_equal(eval_a.numpy(), eval_b.numpy())
    assert not np.allclose(train_a.numpy(), eval_a.numpy())


def test_a_rows_dropout_mask_depends_on_its_place_in_the_global_batch_alone():
    """Rank r of N draws, for its B rows, the masks one process of N x B rows draws for those rows: so N ranks
    train what one process does with dropout too, and a run resumed on another number of ranks goes on."""
    config = override(PRESETS.get("test"), dict(SMALLISH, keep_prob="0.5"))
    whole = PTBModel(config, 30, Unrolling.for_config(config, 5), seed=3)
    masks = whole._dropout_mask([5, 12, 16]).numpy()
    for ranks in (2, 3, 4):
        rows = 12 // ranks
        for rank in range(ranks):
            model = PTBModel(config, 30, Unrolling.for_config(config, 5), seed=3, replica=(rank, ranks))
            mine = model._dropout_mask([5, rows, 16]).numpy()
            np.testing.assert_array_equal(mine, masks[:, rank * rows:(rank + 1) * rows])
    assert 0.3 < (masks == 0).mean() < 0.7


def test_resume_gives_the_same_next_step_loss(corpus, tmp_path):
    config = override(PRESETS.get("test"), dict(SMALLISH, keep_prob="0.8"))
    straight = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "a"), max_steps=12))
    first = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "b"), max_steps=7))
    assert first["steps"] == 7
    resumed = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "b"), max_steps=12,
                                                    resume=True))
    assert resumed["steps"] == 12
    # Train perplexity of the epoch so far, valid and test: the same figures as without the break.
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key


def test_epochs_history_plot_and_metrics(corpus, tmp_path):
    config = override(PRESETS.get("test"), dict(SMALLISH, max_max_epoch="2", max_epoch="1"))
    metrics_path = tmp_path / "m.json"
    m = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "run"),
                                              metrics_json=str(metrics_path)))
    data = reader.load(corpus)
    steps = reader.epoch_size(len(data.train), 4, 5)
    assert m["steps"] == 2 * steps and m["epochs"] == 2
    assert [h["learning_rate"] for h in m["history"]] == [1.0, 0.5]
    assert m["valid_perplexity"] == m["history"][-1]["valid_perplexity"]
    saved = json.loads(metrics_path.read_text())
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity", "words_per_sec", "steps", "epochs",
                "world_size", "config", "versions"):
        assert key in saved, key
    assert saved["world_size"] == 1 and saved["config"]["hidden_size"] == 16
    assert saved["versions"]["tensorflow"] == tf.__version__
    assert os.path.getsize(tmp_path / "run" / "perplexity.png") > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run" / "tensorboard"))
    # The vocabulary is small, so a trained model beats the uniform guess.
    assert saved["test_perplexity"] < data.vocab_size


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_other_cells_train(corpus, tmp_path, cell):
    config = override(PRESETS.get("test"), dict(SMALLISH, cell=cell, max_grad_norm="5", learning_rate="0.3"))
    m = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / cell), max_steps=60))
    assert m["steps"] == 60 and m["test_perplexity"] < 0.8 * reader.load(corpus).vocab_size


@pytest.mark.parametrize("trained, restored", [("block", "dynamic"), ("static", "block")])
def test_checkpoints_move_between_modes(corpus, tmp_path, trained, restored):
    """A model trained in one mode restores in another and gives the same loss."""
    base = dict(SMALLISH, use_peepholes="true", max_grad_norm="5")
    save = str(tmp_path / "run")
    first = ptb_job.run(override(PRESETS.get("test"), dict(base, rnn_mode=trained)),
                               RunOptions(data_path=corpus, save_path=save, max_steps=8))
    again = ptb_job.run(override(PRESETS.get("test"), dict(base, rnn_mode=restored)),
                               RunOptions(data_path=corpus, save_path=save, max_steps=8, resume=True))
    assert (first["rnn_mode"], again["rnn_mode"]) == (trained, restored)
    assert again["steps"] == 8
    for key in ("valid_perplexity", "test_perplexity"):
        assert again[key] == pytest.approx(first[key], rel=1e-5), key


def test_learning_rate_scaling_and_warmup():
    from distrnn.ptb.trainer import learning_rate
    c = PRESETS.get("small")  # lr 1.0, constant for 4 epochs, then halved
    assert learning_rate(c, 0, 0, 4.0) == 1.0
    assert learning_rate(c, 0, 0, 4.0, "linear") == 4.0
    assert learning_rate(c, 0, 0, 4.0, "sqrt") == 2.0
    assert learning_rate(c, 5, 0, 4.0, "linear") == 1.0  # 4 x 0.25
    # warmup: from 1x at step 0 to 4x at step 10, linearly
    assert [learning_rate(c, 0, s, 4.0, "linear", 10) for s in (0, 5, 10, 20)] == [1.0, 2.5, 4.0, 4.0]
