"""Training and evaluation of the row-by-row image classifier.

`train_and_evaluate(config, options)` is the whole job; `python -m distrnn.mnist`
only parses flags and calls it, and the tests call it the same way.

Batches: every epoch visits the training images (those after the validation
split) in an order drawn from (seed, epoch) alone, so a resumed run sees the
batches the uninterrupted one would. A step takes the next `global batch`
images of that order; rank r trains on its contiguous share of them, so N
ranks of B images compute what one process of N x B images does.
"""
import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from distrnn import distributed, loop, memory, outputs, placement, training
from distrnn.adam import Adam
from distrnn.checkpoints import Checkpoints
from distrnn.errors import OutOfMemory, UsageError
from distrnn.mnist import idx, plots
from distrnn.mnist.model import RowClassifier, part_memory
from distrnn.rnn import KEEP, Memory
from distrnn.rnn.stack import stack_mode
from distrnn.outputs import log

# Fields that fix variable shapes or the meaning of a saved position (with the global batch and the
# image size): a checkpoint cannot be resumed under different values.
SHAPE_FIELDS = ("cell", "num_layers", "hidden_size", "use_peepholes", "validation_size")
EVAL_BATCH = 1000      # images an evaluation step
MISCLASSIFIED_SHOWN = 24


@dataclasses.dataclass
class RunOptions(training.JobOptions):
    dataset: str = "mnist"  # the published data set downloaded when data_path is not given


@dataclasses.dataclass
class Position:
    """Where a run stands; saved with every checkpoint so --resume continues exactly."""
    epoch: int = 0             # 0-based epoch in progress
    step_in_epoch: int = 0     # next batch of that epoch
    global_step: int = 0       # training steps done in all
    epoch_loss: float = 0.0    # sum of the steps' mean losses this epoch
    epoch_accuracy: float = 0.0  # sum of the steps' accuracies this epoch
    history: list = dataclasses.field(default_factory=list)  # per finished epoch: losses and accuracies

    @property
    def train_loss(self) -> Optional[float]:
        return self.epoch_loss / self.step_in_epoch if self.step_in_epoch else None

    @property
    def train_accuracy(self) -> Optional[float]:
        return self.epoch_accuracy / self.step_in_epoch if self.step_in_epoch else None


class Trainer(tf.Module):
    """The model, its optimizer and the run's position: everything a checkpoint holds."""

    def __init__(self, config, image_shape, seed: int, on_gpu: bool = False, plan=None,
                 placement: str = "sequential", world=None, memory: Memory = KEEP):
        super().__init__(name="trainer")
        self.world = world or distributed.World()
        try:
            self.rnn_mode, self.rnn_mode_reason = stack_mode(config.cell, config.use_peepholes, config.rnn_mode,
                                                             on_gpu, image_shape[0], placement, memory)
        except ValueError as error:
            raise UsageError(str(error)) from None
        self.model = RowClassifier(config, image_shape, seed=seed, rnn_mode=self.rnn_mode, plan=plan,
                                   placement=placement, memory=memory)
        self.optimizer = Adam(config.learning_rate)
        self.optimizer.build(self.model.trainable_variables)  # the moments exist before a restore fills them
        self._position = tf.Variable(json.dumps(dataclasses.asdict(Position())), dtype=tf.string, trainable=False)
        images = tf.TensorSpec([None, *image_shape], tf.float32)
        labels = tf.TensorSpec([None], tf.int32)
        self.train_step = tf.function(self._train_step, input_signature=[images, labels])
        self.eval_step = tf.function(self._eval_step, input_signature=[images, labels])

    def checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, position=self._position)

    def record(self, position: Position) -> None:
        self._position.assign(json.dumps(dataclasses.asdict(position)))

    def position(self) -> Position:
        return Position(**json.loads(self._position.numpy().decode()))

    def share_from_chief(self) -> None:
        """After rank 0 restored (or initialised) the run: every rank takes its weights, Adam's
        moments and step count, and the position."""
        if self.world.size == 1:
            return
        self.world.broadcast_variables(list(self.model.variables) + list(self.optimizer.variables))
        self._position.assign(self.world.broadcast_object(self._position.numpy()))

    def _train_step(self, images, labels):
        """One Adam step on this rank's images (B, R, C); returns the global batch's mean loss and accuracy,
        and the gradient's global norm."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(images)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        tape = self.world.wrap_tape(tape)  # averaged over ranks: the global batch's mean
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), labels), tf.float32))
        return tf.concat([self.world.average(tf.stack([loss, accuracy])), [tf.linalg.global_norm(grads)]], 0)

    def _eval_step(self, images, labels):
        """(sum of the losses, predicted classes) of images (B, R, C)."""
        logits = self.model(images)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return loss, tf.argmax(logits, 1, output_type=tf.int32)


@dataclasses.dataclass(frozen=True)
class Pixels:
    """uint8 images -> float32 inputs, standardised with the mean and standard deviation of the
    training images' pixels. Zero-mean inputs train faster than pixels in [0, 1], whose mostly
    black background feeds every gate the same bias (measured, lstm preset on Fashion-MNIST, seed 2:
    validation accuracy 85.68% after the first epoch against 82.28%)."""
    mean: float  # of the training pixels, scaled to [0, 1]
    std: float

    @classmethod
    def of(cls, images: np.ndarray) -> "Pixels":
        """Exact, from the histogram of the 256 grey levels (no float copy of the images)."""
        counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
        levels = np.arange(256) / 255.0
        mean = float(counts @ levels / counts.sum())
        std = float(np.sqrt(counts @ (levels - mean) ** 2 / counts.sum()))
        return cls(mean, std or 1.0)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return ((images.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order of the training images in `epoch`: a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def hold_out(train: idx.Split, validation_size: int):
    """(training, validation): the first `validation_size` images of the file validate."""
    if validation_size >= len(train.labels):
        raise UsageError(f"validation_size {validation_size} leaves none of the {len(train.labels)} training images "
                         f"to train on; pass --validation_size below {len(train.labels)}")
    return (idx.Split(train.images[validation_size:], train.labels[validation_size:]),
            idx.Split(train.images[:validation_size], train.labels[:validation_size]))


@dataclasses.dataclass
class Evaluation:
    loss: float                  # mean cross-entropy
    accuracy: float
    confusion: np.ndarray        # (10, 10) counts: row = true class, column = predicted
    misclassified: list          # [(index in the split, predicted class)], the first ones by index

    @property
    def per_class_accuracy(self) -> list:
        totals = self.confusion.sum(axis=1)
        return [float(self.confusion[c, c] / totals[c]) if totals[c] else None for c in range(len(totals))]


def evaluate(trainer: Trainer, split: idx.Split, pixels: Pixels, world) -> Optional[Evaluation]:
    """Exact figures over a whole split: each rank classifies a contiguous share of it, and the
    losses and confusion counts are summed over ranks. None for an empty split."""
    count = len(split.labels)
    if count == 0:
        return None
    mine = np.array_split(np.arange(count), world.size)[world.rank]
    confusion = np.zeros((idx.NUM_CLASSES, idx.NUM_CLASSES), np.int64)
    loss, wrong = 0.0, []
    for lo in range(0, len(mine), EVAL_BATCH):
        chunk = mine[lo:lo + EVAL_BATCH]
        labels = split.labels[chunk].astype(np.int32)
        batch_loss, predicted = trainer.eval_step(pixels(split.images[chunk]), labels)
        predicted = predicted.numpy()
        loss += float(batch_loss)
        np.add.at(confusion, (labels, predicted), 1)
        if len(wrong) < MISCLASSIFIED_SHOWN:
            wrong += [(int(i), int(p)) for i, p, y in zip(chunk, predicted, labels) if p != y]
    sums = world.allreduce_sum(np.concatenate([[loss], confusion.ravel()]))
    confusion = sums[1:].reshape(confusion.shape).astype(np.int64)
    wrong = sorted(w for rank_wrong in world.allgather_object(wrong[:MISCLASSIFIED_SHOWN]) for w in rank_wrong)
    return Evaluation(float(sums[0] / count), float(np.trace(confusion) / count), confusion,
                      wrong[:MISCLASSIFIED_SHOWN])


def layer_devices(config, devices):
    """The devices the layers go on, and a line saying why when the preset asked to spread them."""
    if devices or not config.spread_layers or config.num_layers < 2:
        return devices, None
    gpus = [placement.canonical(d.name) for d in tf.config.list_logical_devices("GPU")]
    if len(gpus) > 1:
        used = min(len(gpus), config.num_layers)
        return gpus[:config.num_layers], f"spread_layers: the layers spread over {used} GPUs, one layer per GPU"
    return devices, ("spread_layers: this process has fewer than 2 GPUs, so every layer is on one device; --num_gpus "
                     "N, --devices or --virtual_devices N place the layers on N devices")


def make_model_plan(config, image_shape, batch_size: int, devices, strategy: str):
    if not devices:
        return placement.single_device(config.num_layers)
    costs = [part.total for part in part_memory(config, image_shape, batch_size)]
    return placement.make_plan(config.num_layers, devices, strategy, costs)


def train_and_evaluate(config, options: RunOptions, world=None) -> dict:
    """Trains, validates every epoch, tests at the end; returns the metrics dict.

    Returns early with metrics["interrupted"] set to the exit code (a signal's, or 76 when memory
    ran short) after saving a checkpoint.
    """
    reference_batch = config.batch_size  # what the config's learning rate was chosen for
    return training.run_job("mnist", config, options, lambda config, world, save_path, devices: _run(
        config, reference_batch, options, world, save_path, devices), world)


def _run(config, reference_batch: int, options: RunOptions, world, save_path: str, devices) -> dict:
    started = time.time()
    job = MNISTJob(config, reference_batch, options, world, devices)
    checkpoints = Checkpoints(job.trainer.checkpoint(), save_path)
    # Rank 0 alone touches save_path and restores; its outcome (or its error) reaches every rank.
    keys = SHAPE_FIELDS + ("global_batch_size", "image_shape")
    resumed = distributed.on_chief(world, lambda: checkpoints.open_run(options.resume, job.saved_config, keys))
    job.trainer.share_from_chief()
    if world.is_chief:
        data, pixels = job.data, job.pixels
        title = data.dataset.title if data.dataset else "IDX files (not a published MNIST or Fashion-MNIST)"
        log(f"data {job.data_path}: {title}, {'x'.join(map(str, data.image_shape))} images: train "
            f"{len(job.train.labels)}, validation {len(job.valid.labels)} (held out of train), test "
            f"{len(data.test.labels)}; inputs standardised with the training pixels' mean {pixels.mean:.4f} and "
            f"standard deviation {pixels.std:.4f}")
        loop.log_start(job, options, checkpoints, resumed, save_path,
                       notes=[job.spread_note] if job.spread_note else [])
    return loop.run(job, world, options, checkpoints, save_path, started)


class MNISTJob(loop.Job):
    """The row-by-row classifier as the training loop sees it: batches of images in an order fixed by
    (seed, epoch), losses and accuracies."""

    name, unit, rate_key = "MNIST", "images", "examples_per_sec"

    def __init__(self, config, reference_batch: int, options: RunOptions, world, devices):
        self.config, self.options, self.world = config, options, world
        self.data_path = distributed.chief_first(world, lambda: idx.resolve_data_path(options.data_path,
                                                                                         options.dataset))
        self.data = data = idx.load(self.data_path)
        self.train, self.valid = hold_out(data.train, config.validation_size)
        self.pixels = Pixels.of(self.train.images)
        B = config.batch_size  # on each rank; B * world.size images a step in all
        self.global_batch = self.units_per_step = B * world.size
        self.batch_text = f"batch_size {B}" + (f" on each of {world.size} ranks" if world.size > 1 else "")
        self.steps_per_epoch = len(self.train.labels) // self.global_batch
        if self.steps_per_epoch < 1:
            raise UsageError(f"{len(self.train.labels)} training images are too few for {self.batch_text} "
                             f"({self.global_batch} a step); lower --batch_size or --validation_size")
        self.lr_ratio = self.global_batch / reference_batch
        self.devices, self.spread_note = layer_devices(config, devices)
        self.plan = make_model_plan(config, data.image_shape, B, self.devices, options.strategy)
        self.trainer = Trainer(config, data.image_shape, options.seed,
                               on_gpu=bool(tf.config.list_logical_devices("GPU")), plan=self.plan,
                               placement=options.placement, world=world, memory=options.memory)
        self.saved_config = dict(dataclasses.asdict(config), global_batch_size=self.global_batch,
                                 image_shape=list(data.image_shape), name=options.config_name)
        self.max_epochs = options.max_epochs or config.num_epochs
        self.total_steps = self.max_epochs * self.steps_per_epoch
        if options.max_steps:
            self.total_steps = min(self.total_steps, options.max_steps)
        self.order = None

    def learning_rate(self, pos) -> float:
        lr = self.config.learning_rate * distributed.lr_factor(self.lr_ratio, self.options.lr_scaling,
                                                               pos.global_step, self.options.lr_warmup_steps)
        self.trainer.optimizer.learning_rate.assign(lr)
        return lr

    def begin_epoch(self, pos) -> None:
        self.order = epoch_order(self.options.seed, pos.epoch, len(self.train.labels))

    def train_step(self, pos, i: int):
        batch = self.world.stripe(self.order[i * self.global_batch:(i + 1) * self.global_batch])  # (B,) indices
        try:
            loss, accuracy, norm = self.trainer.train_step(self.pixels(self.train.images[batch]),
                                                           self.train.labels[batch].astype(np.int32)).numpy()
        except tf.errors.ResourceExhaustedError as error:
            # A failed step changed no weight: Adam's update comes after every gradient.
            raise OutOfMemory(f"step {pos.global_step + 1} ran out of memory ({memory.oom_reason(error)})") from None
        pos.epoch_loss += float(loss)
        pos.epoch_accuracy += float(accuracy)
        return {"loss": float(loss), "gradient norm": float(norm)}

    def figures(self, pos):
        return (f"train loss {pos.train_loss:.4f} accuracy {100 * pos.train_accuracy:.2f}%",
                {"loss": pos.train_loss, "accuracy": pos.train_accuracy})

    def divergence_advice(self, lr: float) -> str:
        return f"lower --learning_rate (now {lr:g})"

    def record(self, pos, end_of_epoch: bool) -> None:
        self.trainer.record(pos)

    def validate(self, pos, lr: float):
        checked = evaluate(self.trainer, self.valid, self.pixels, self.world)
        entry = {"epoch": pos.epoch + 1, "train_loss": pos.train_loss, "train_accuracy": pos.train_accuracy,
                 "valid_loss": checked.loss if checked else None,
                 "valid_accuracy": checked.accuracy if checked else None, "learning_rate": lr}
        text = (f"train loss {pos.train_loss:.4f} accuracy {100 * pos.train_accuracy:.2f}%" +
                (f" | valid loss {checked.loss:.4f} accuracy {100 * checked.accuracy:.2f}%" if checked else ""))
        return entry, text, {"valid_loss": checked.loss, "valid_accuracy": checked.accuracy} if checked else {}

    def end_epoch(self, pos) -> None:
        pos.epoch_loss, pos.epoch_accuracy = 0.0, 0.0

    def finish(self, pos, speed):
        data = self.data
        checked = evaluate(self.trainer, self.valid, self.pixels, self.world)
        self.tested = tested = evaluate(self.trainer, data.test, self.pixels, self.world)
        own = {
            "test_accuracy": tested.accuracy, "test_loss": tested.loss,
            "per_class_accuracy": tested.per_class_accuracy, "confusion_matrix": tested.confusion.tolist(),
            "classes": list(data.classes),
            "misclassified": [{"index": i, "true": int(data.test.labels[i]), "predicted": p}
                              for i, p in tested.misclassified],
            "valid_accuracy": checked.accuracy if checked else None,
            "valid_loss": checked.loss if checked else None,
            "train_accuracy": pos.train_accuracy if pos.step_in_epoch else
            (pos.history[-1]["train_accuracy"] if pos.history else None),
            "config": dataclasses.asdict(self.config),
            "dataset": data.dataset.name if data.dataset else None,
            "images": {"train": len(self.train.labels), "valid": len(self.valid.labels),
                       "test": len(data.test.labels)},
            "pixels": dataclasses.asdict(self.pixels),
        }
        valid_text = f"valid accuracy {100 * checked.accuracy:.2f}% | " if checked else ""
        text = f"{valid_text}test accuracy {100 * tested.accuracy:.2f}% (loss {tested.loss:.4f})"
        return (own, text, {"test_accuracy": tested.accuracy, "test_loss": tested.loss},
                {"test_accuracy": tested.accuracy})

    def plot(self, pos, save_path: str) -> None:
        data, tested, name = self.data, self.tested, self.options.config_name
        title = data.dataset.title if data.dataset else "IDX"
        plots.confusion_matrix(os.path.join(save_path, "confusion_matrix.png"), tested.confusion, data.classes,
                               f"{title} test, {name}: accuracy {100 * tested.accuracy:.2f}%")
        plots.misclassified(os.path.join(save_path, "misclassified.png"), data.test, tested.misclassified,
                            data.classes, f"{title} test images the {name} model gets wrong")
        if pos.history:
            outputs.plot_curves(os.path.join(save_path, "accuracy.png"), f"{title} {name}", "accuracy",
                                 {"train": [h["train_accuracy"] for h in pos.history],
                                  "valid": [h["valid_accuracy"] for h in pos.history]}, log_scale=False)
