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
import os
import time

import numpy as np
import tensorflow as tf

from distrnn import distributed, loop, memory, outputs, training
from distrnn.checkpoints import Checkpoints
from distrnn.errors import OutOfMemory, UsageError
from distrnn.mnist import idx, plots
from distrnn.mnist.trainer import Pixels, Trainer, epoch_order, evaluate, hold_out, layer_devices, make_model_plan
from distrnn.outputs import log

# Fields that fix variable shapes or the meaning of a saved position (with the global batch and the
# image size): a checkpoint cannot be resumed under different values.
SHAPE_FIELDS = ("cell", "num_layers", "hidden_size", "use_peepholes", "validation_size")


@dataclasses.dataclass
class RunOptions(training.JobOptions):
    dataset: str = "mnist"  # the published data set downloaded when data_path is not given


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

    unit, rate_key = "images", "examples_per_sec"

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
