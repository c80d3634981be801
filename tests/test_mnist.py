"""The row-by-row image classifier: IDX reading, the model in every mode and placement, training,
evaluation, checkpoints and the command line."""
import gzip
import json
import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from conftest import CAPPED, assert_one_line_error, checkpoint_step, idx_bytes, run_module, write_images
from distrnn.config import override
from distrnn.errors import UsageError
from distrnn.mnist import idx
from distrnn.mnist.configs import PRESETS
from distrnn.mnist import job as mnist_job
from distrnn.mnist.configs import RunOptions
from distrnn.mnist.trainer import Pixels, Trainer, epoch_order, evaluate
from distrnn.parallel import OneProcess
from distrnn.parallel.placement import make_plan
from distrnn.rnn import Unrolling

SMALL = {"hidden_size": "16", "batch_size": "20", "validation_size": "100", "learning_rate": "0.01"}


def config(**changes):
    return override(PRESETS.get("test"), dict(SMALL, **{k: str(v) for k, v in changes.items()}))


def run_mnist(*args, **kwargs):
    return run_module("distrnn.mnist", *args, **kwargs)


def assert_usage_error(proc, *fragments):
    assert_one_line_error(proc, "distrnn.mnist", *fragments)


# --- IDX files -----------------------------------------------------------------------------------

def test_idx_parse_exact():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(images)
    assert data[:4] == bytes([0, 0, 8, 3]) and data[4:16] == bytes([0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    np.testing.assert_array_equal(idx.parse("x", data, idx.IMAGES_MAGIC), images)
    labels = np.array([7, 0, 9], np.uint8)
    np.testing.assert_array_equal(idx.parse("y", idx_bytes(labels), idx.LABELS_MAGIC), labels)


@pytest.mark.parametrize("mangle, message", [
    (lambda d: d[:-1], "39 bytes where its header (2 x 3 x 4) needs 40: truncated"),
    (lambda d: d + b"\0", "41 bytes where its header (2 x 3 x 4) needs 40: trailing bytes"),
    (lambda d: d[:10], "10 bytes, shorter than its 16-byte header"),
    (lambda d: bytes([0, 0, 8, 1]) + d[4:], "magic number 0x00000801, expected 0x00000803"),
])
def test_idx_parse_refuses_bad_files(mangle, message):
    data = idx_bytes(np.zeros((2, 3, 4), np.uint8))  # 16 bytes of header, 24 pixels
    with pytest.raises(UsageError) as error:
        idx.parse("train-images-idx3-ubyte.gz", mangle(data), idx.IMAGES_MAGIC)
    text = str(error.value)
    assert text.startswith("train-images-idx3-ubyte.gz is not an IDX file of images: ")
    assert message in text and "--data_path" in text


def test_load_checks_files_and_splits(tmp_path):
    directory = write_images(tmp_path / "d", train=50, test=20)
    data = idx.load(directory)
    assert data.image_shape == (12, 10) and data.dataset is None and len(data.train.labels) == 50
    assert data.classes == tuple("0123456789")
    # Labels of another split: counts differ.
    os.replace(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"), tmp_path / "test-labels")
    os.replace(os.path.join(directory, "train-labels-idx1-ubyte.gz"),
               os.path.join(directory, "t10k-labels-idx1-ubyte.gz"))
    os.replace(tmp_path / "test-labels", os.path.join(directory, "train-labels-idx1-ubyte.gz"))
    with pytest.raises(UsageError, match="train-images-idx3-ubyte.gz holds 50 images but .*train-labels-idx1-ubyte.gz "
                                         "20 labels"):
        idx.load(directory)
    # A truncated download: not a complete gzip file.
    path = os.path.join(directory, "t10k-images-idx3-ubyte.gz")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) // 2])
    with pytest.raises(UsageError, match="t10k-images-idx3-ubyte.gz is not a complete gzip file"):
        idx.load(directory)
    os.remove(path)
    with pytest.raises(UsageError, match="missing data file .*t10k-images-idx3-ubyte.gz; pass --data_path DIR"):
        idx.load(directory)


def test_labels_beyond_ten_classes(tmp_path):
    directory = write_images(tmp_path / "d", train=30, test=10)
    with open(os.path.join(directory, "train-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(gzip.compress(idx_bytes(np.full(30, 12, np.uint8))))
    with pytest.raises(UsageError, match="has label 12; labels must be 0..9"):
        idx.load(directory)


def test_shared_fashion_mnist_is_recognised_and_verified(fashion_mnist):
    data = idx.load(fashion_mnist)
    assert data.dataset.name == "fashion_mnist" and data.classes[9] == "Ankle boot"
    assert data.train.images.shape == (60000, 28, 28) and data.test.labels.shape == (10000,)
    # The class counts Fashion-MNIST publishes: 6,000 a class in train, 1,000 in test.
    assert np.bincount(data.train.labels).tolist() == [6000] * 10
    assert np.bincount(data.test.labels).tolist() == [1000] * 10
    idx.verify(fashion_mnist, idx.DATASETS["fashion_mnist"])
    with pytest.raises(UsageError, match="is not the published MNIST file"):
        idx.verify(fashion_mnist, idx.DATASETS["mnist"])


def test_download_verifies_before_anything_reaches_the_cache(tmp_path, monkeypatch, fashion_mnist):
    cache = tmp_path / "cache"
    own = write_images(tmp_path / "own", train=30, test=10)
    monkeypatch.setenv("DISTRNN_MNIST_URL", f"file://{own}")
    with pytest.raises(UsageError, match="train-images-idx3-ubyte.gz is not the published MNIST file"):
        idx.fetch(str(cache), idx.DATASETS["mnist"])
    assert not any(name.endswith(".gz") for name in os.listdir(cache))
    # A mirror holding the real files: fetched and verified.
    monkeypatch.setenv("DISTRNN_FASHION_MNIST_URL", f"file://{os.path.abspath(fashion_mnist)}/")
    idx.fetch(str(cache), idx.DATASETS["fashion_mnist"])
    assert sorted(n for n in os.listdir(cache) if n.endswith(".gz")) == sorted(idx.FILE_NAMES)
    monkeypatch.setenv("DISTRNN_MNIST_URL", "http://127.0.0.1:9/mnist")  # nothing listens there
    with pytest.raises(UsageError, match="could not download MNIST from http://127.0.0.1:9/mnist/train-images"):
        idx.fetch(str(tmp_path / "other"), idx.DATASETS["mnist"])


# --- the model ------------------------------------------------------------------------------------

def test_inputs_are_standardised_with_the_training_pixels():
    images = np.array([[[0, 255], [255, 51]]], np.uint8)
    pixels = Pixels.of(images)
    values = images / 255.0
    assert pixels.mean == pytest.approx(values.mean(), rel=1e-12) and pixels.std == pytest.approx(values.std(),
                                                                                                   rel=1e-12)
    standardised = pixels(images)
    assert standardised.dtype == np.float32
    np.testing.assert_allclose(standardised, (values - values.mean()) / values.std(), rtol=1e-6)
    assert Pixels.of(np.zeros((2, 3, 3), np.uint8)) == Pixels(0.0, 1.0)  # blank images: no division by 0


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_order(1, 3, 100)
    np.testing.assert_array_equal(a, epoch_order(1, 3, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_order(1, 4, 100)) and not np.array_equal(a, epoch_order(2, 3, 100))


MODES = [("lstm", "static"), ("lstm", "dynamic"), ("lstm", "block"), ("gru", "static"), ("gru", "dynamic"),
         ("rnn", "static"), ("rnn", "dynamic")]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_every_mode_gives_the_same_logits_and_gradients(cell):
    images = np.random.default_rng(0).random((5, 12, 10), dtype=np.float32)
    labels = np.arange(5, dtype=np.int32)
    results = []
    for mode in [m for c, m in MODES if c == cell]:
        trainer = Trainer(config(cell=cell, rnn_mode=mode, num_layers=2), (12, 10), seed=4)
        assert trainer.unrolling.mode == mode
        with tf.GradientTape() as tape:
            logits = trainer.model(images)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, trainer.model.trainable_variables)
        results.append((mode, logits.numpy(), [g.numpy() for g in grads]))
    _, logits0, grads0 = results[0]
    for mode, logits, grads in results[1:]:
        np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-6, err_msg=mode)
        for g, g0 in zip(grads, grads0):
            np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6, err_msg=mode)


@pytest.mark.parametrize("schedule", ["sequential", "pipeline"])
def test_layers_on_three_devices_compute_what_one_device_does(schedule):
    """The stacked preset's layout: each layer on its own (virtual) device."""
    cfg = config(num_layers=3, rnn_mode="dynamic")
    images = np.random.default_rng(1).random((4, 12, 10), dtype=np.float32)
    one = Trainer(cfg, (12, 10), seed=2)
    devices = [f"/device:CPU:{i}" for i in range(3)]
    three = Trainer(cfg, (12, 10), seed=2, unrolling=Unrolling.for_config(cfg, 12, placement=schedule),
                    plan=make_plan(3, devices))
    assert [c.kernel.device.split("/")[-1] for c in three.model.cells] == ["device:CPU:0", "device:CPU:1",
                                                                            "device:CPU:2"]
    assert three.model.dense_w.device.endswith("CPU:2")
    np.testing.assert_allclose(three.model(images).numpy(), one.model(images).numpy(), rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_on_a_repeated_batch(images):
    trainer = Trainer(config(), (12, 10), seed=0)
    data = idx.load(images)
    x, y = Pixels.of(data.train.images)(data.train.images[:20]), data.train.labels[:20].astype(np.int32)
    losses = [float(trainer.train_step(x, y)[0]) for _ in range(40)]
    assert losses[0] == pytest.approx(np.log(10), rel=0.1)  # a fresh model is close to uniform over 10 classes
    assert losses[-1] < 0.5 * losses[0]


def test_evaluation_is_exact(images):
    trainer = Trainer(config(), (12, 10), seed=3)
    data = idx.load(images)
    pixels = Pixels(0.25, 0.5)
    result = evaluate(trainer, data.test, pixels, OneProcess())
    logits = trainer.model(((data.test.images / 255.0 - 0.25) / 0.5).astype(np.float32)).numpy()
    predicted = logits.argmax(1)
    labels = data.test.labels
    expected = np.zeros((10, 10), np.int64)
    for t, p in zip(labels, predicted):
        expected[t, p] += 1
    np.testing.assert_array_equal(result.confusion, expected)
    assert result.accuracy == np.mean(predicted == labels)
    assert result.per_class_accuracy == [expected[c, c] / expected[c].sum() for c in range(10)]
    wrong = [(int(i), int(p)) for i, p in enumerate(predicted) if p != labels[i]]
    assert result.misclassified == wrong[:24]
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert result.loss == pytest.approx(-log_softmax[np.arange(len(labels)), labels].mean(), rel=1e-5)


# --- whole runs -----------------------------------------------------------------------------------

def test_run_writes_metrics_plots_and_tensorboard(images, tmp_path):
    metrics_path = tmp_path / "m.json"
    m = mnist_job.run(config(num_epochs=3), RunOptions(data_path=images, save_path=str(tmp_path / "run"),
                                                              metrics_json=str(metrics_path)))
    assert m["steps_per_epoch"] == 500 // 20 and m["steps"] == 75 and m["epochs"] == 3
    assert m["images"] == {"train": 500, "valid": 100, "test": 200}
    saved = json.loads(metrics_path.read_text())
    for key in ("test_accuracy", "per_class_accuracy", "confusion_matrix", "examples_per_sec", "valid_accuracy",
                "history", "classes", "misclassified", "versions"):
        assert key in saved, key
    assert sum(map(sum, saved["confusion_matrix"])) == 200 and len(saved["per_class_accuracy"]) == 10
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3]
    # The bright row gives the class away: far above chance (10%) in three epochs.
    assert saved["test_accuracy"] > 0.8 and saved["valid_accuracy"] > 0.8
    for picture in ("confusion_matrix.png", "misclassified.png", "accuracy.png"):
        assert os.path.getsize(tmp_path / "run" / picture) > 5000, picture
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run" / "tensorboard"))


def test_resume_continues_exactly(images, tmp_path):
    cfg = config(num_epochs=2)
    straight = mnist_job.run(cfg, RunOptions(data_path=images, save_path=str(tmp_path / "a"), max_steps=37))
    first = mnist_job.run(cfg, RunOptions(data_path=images, save_path=str(tmp_path / "b"), max_steps=31))
    assert first["steps"] == 31  # stopped in the second epoch, mid-way through its order of images
    resumed = mnist_job.run(cfg, RunOptions(data_path=images, save_path=str(tmp_path / "b"), max_steps=37,
                                                 resume=True))
    assert resumed["steps"] == 37
    for key in ("test_loss", "test_accuracy", "valid_loss", "train_accuracy"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key
    assert resumed["confusion_matrix"] == straight["confusion_matrix"]


# --- the command line -----------------------------------------------------------------------------

TINY = ["--config", "test", "--hidden_size", "8", "--validation_size", "100"]


@pytest.mark.parametrize("args, fragments", [
    (["--hidden_size", "0"], ["hidden_size must be positive, got 0"]),
    (["--cell", "gru", "--rnn_mode", "block"], ["rnn_mode block runs LSTM cells only"]),
    (["--rnn_mode", "cudnn"], ["rnn_mode cudnn needs a GPU with cuDNN and this process has none"]),
    (["--validation_size", "600"], ["validation_size 600 leaves none of the 600 training images to train on"]),
    (["--batch_size", "1000"], ["500 training images are too few for batch_size 1000", "lower --batch_size"]),
    (["--config", "huge"], ["unknown --config 'huge'; choose one of: basic_rnn, lstm, stacked, test"]),
    (["--dataset", "cifar"], ["argument --dataset: invalid choice: 'cifar'"]),
    (["--num_layer", "2"], ["unrecognized arguments: --num_layer", "did you mean --num_layers?"]),
    (["--devices", "/gpu:0"], ["device(s) /device:GPU:0 do not exist", "--virtual_devices N"]),
])
def test_bad_input_is_one_line(args, fragments, images, tmp_path):
    assert_usage_error(run_mnist(*TINY, "--data_path", images, "--save_path", tmp_path / "s", *args), *fragments)
    assert not (tmp_path / "s" / "checkpoints").exists()


def test_corrupt_data_is_one_line_and_checkpoints_survive(images, tmp_path):
    save = tmp_path / "run"
    run_mnist(*TINY, "--data_path", images, "--save_path", save, "--max_steps", "3", check=0)
    before = sorted(os.listdir(save / "checkpoints"))
    path = os.path.join(images, "train-images-idx3-ubyte.gz")
    content = gzip.decompress(open(path, "rb").read())
    with open(path, "wb") as f:
        f.write(gzip.compress(content[:-7]))  # a truncated image file, gzipped intact
    assert_usage_error(run_mnist(*TINY, "--data_path", images, "--save_path", save, "--resume"),
                       "train-images-idx3-ubyte.gz is not an IDX file of images", "truncated", "--data_path")
    assert sorted(os.listdir(save / "checkpoints")) == before
    assert_usage_error(run_mnist(*TINY, "--hidden_size", "12", "--data_path", write_images(tmp_path / "ok"),
                                 "--save_path", save, "--resume"),
                       "are from another config", "hidden_size=8 there, 12 here")


def test_default_data_offline_and_corrupt(tmp_path):
    """Without --data_path MNIST is fetched into ~/.cache/distrnn/mnist and checked."""
    env = {"HOME": str(tmp_path), "DISTRNN_MNIST_URL": "http://127.0.0.1:9/mnist"}
    assert_usage_error(run_mnist(*TINY, "--save_path", tmp_path / "s", env=env), "could not download MNIST",
                       "--data_path", "DISTRNN_MNIST_URL")
    cache = write_images(tmp_path / ".cache" / "distrnn" / "mnist", train=30, test=10)
    assert_usage_error(run_mnist(*TINY, "--save_path", tmp_path / "s", env=env),
                       "train-images-idx3-ubyte.gz is not the published MNIST file", f"delete {cache}")
    assert len(os.listdir(cache)) == 4  # the user's files are left alone


def test_list_configs():
    out = run_mnist("--list_configs", check=0).stdout
    assert "cell=rnn, num_layers=1, hidden_size=150" in out and "num_layers=3, hidden_size=128" in out


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(images, tmp_path, background_process):
    """As test_cli's: the stopped run has no end it could reach before the signal; resumed, it ends
    where an uninterrupted run of the same length ends."""
    common = [*TINY, "--batch_size", "4", "--data_path", images, "--num_epochs", "1000000",
              "--checkpoint_every", "100000"]
    proc = background_process(*common, "--save_path", tmp_path / "b", "--metrics_json", tmp_path / "never.json",
                              module="distrnn.mnist")
    for line in proc.stdout:  # wait until it is training, then stop it as a scheduler would
        if "images/sec |" in line:
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert "stopped by signal: checkpoint saved" in output and not (tmp_path / "never.json").exists()
    stopped_at = checkpoint_step(tmp_path / "b")
    assert stopped_at > 0
    end = ["--max_steps", stopped_at + 150]  # past an epoch's end (125 steps)

    resumed = tmp_path / "resumed.json"
    proc = run_mnist(*common, *end, "--save_path", tmp_path / "b", "--resume", "--metrics_json", resumed, check=0)
    assert f"ckpt-{stopped_at}" in proc.stdout
    straight = tmp_path / "straight.json"
    run_mnist(*common, *end, "--save_path", tmp_path / "a", "--metrics_json", straight, check=0)
    a, b = json.loads(straight.read_text()), json.loads(resumed.read_text())
    assert a["steps"] == b["steps"] == stopped_at + 150
    for key in ("test_loss", "test_accuracy", "valid_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


@pytest.mark.slow
def test_lstm_preset_on_fashion_mnist(fashion_mnist, tmp_path):
    """The real preset on the real data for 80 steps, through the command line."""
    metrics = tmp_path / "m.json"
    proc = run_mnist("--config", "lstm", "--data_path", fashion_mnist, "--save_path", tmp_path / "run",
                     "--max_steps", "80", "--metrics_json", metrics, check=0)
    m = json.loads(metrics.read_text())
    assert m["dataset"] == "fashion_mnist" and m["images"] == {"train": 55000, "valid": 5000, "test": 10000}
    assert m["classes"][0] == "T-shirt/top" and sum(map(sum, m["confusion_matrix"])) == 10000
    # 80 Adam steps take the model far above chance (10%).
    assert m["test_accuracy"] > 0.6
    assert "Fashion-MNIST" in proc.stdout and "test accuracy" in proc.stdout


@pytest.mark.slow
def test_out_of_memory_stops_with_a_checkpoint_and_recompute_finishes_the_run(tmp_path):
    """Images of 1,000 rows: 4 x 128 LSTM units keep about 460 MB of activations for a batch of 32, more than
    TensorFlow's CPU allocator capped at 200 MB (conftest.CAPPED) gives; with --recompute 32 they fit."""
    tall = write_images(tmp_path / "tall", train=200, test=20, rows=1000, cols=10)
    common = ["--config", "test", "--num_layers", "4", "--hidden_size", "128", "--batch_size", "32",
              "--validation_size", "20", "--max_steps", "2", "--data_path", tall, "--save_path", tmp_path / "run"]
    proc = run_mnist(*common, env=CAPPED)
    assert proc.returncode == 76, proc.stdout[-2000:] + proc.stderr[-2000:]
    stopped = [line for line in proc.stdout.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and stopped[0].startswith("stopped: step 1 ran out of memory (OOM when allocating")
    assert "--recompute K" in stopped[0] and f"--resume --save_path {tmp_path / 'run'}" in stopped[0]
    assert (tmp_path / "run" / "checkpoints" / "ckpt-0.index").exists()
    done = run_mnist(*common, "--resume", "--recompute", "32", "--metrics_json", tmp_path / "m.json", env=CAPPED,
                     check=0)
    assert "resumed from" in done.stdout and "memory mode recompute (one state in 32 kept)" in done.stdout
    assert json.loads((tmp_path / "m.json").read_text())["steps"] == 2
