"""The row-by-row image classifier as a training job: `run(config, options)` is the whole of it;
`python -m distrnn.mnist` only parses flags and calls it, and the tests call it the same way. How
batches are drawn: distrnn.mnist.trainer.Splits.
"""

from distrnn import parallel
from distrnn.mnist import idx, plots
from distrnn.mnist.configs import RunOptions
from distrnn.mnist.trainer import Splits, Trainer, epoch_order, evaluate, make_model_plan
from distrnn.parallel import local_devices
from distrnn.run import start
from distrnn.run.job import Curve, Job, Measures

# Fields that fix variable shapes or the meaning of a saved position (with the global batch and the
# image size): a checkpoint cannot be resumed under different values.
SHAPE_FIELDS = ("cell", "num_layers", "hidden_size", "use_peepholes", "validation_size")


def run(config, options: RunOptions, world=None) -> dict:
    """A run of this job: trains, validates every epoch, tests at the end; returns the metrics dict (with
    metrics["interrupted"] the exit code of a stop, after its checkpoint). See distrnn.run.start.run."""
    return start.run(MNISTJob, config, options, world)


class MNISTJob(Job):
    """The row-by-row classifier as the training loop sees it: batches of images in an order fixed by
    (seed, epoch), losses and accuracies."""

    name, shape_fields = "mnist", SHAPE_FIELDS + ("global_batch_size", "image_shape")
    measures = Measures("images", "examples_per_sec", "valid_accuracy", higher_is_better=True,
                        test_keys=("test_accuracy", "test_loss"))

    def __init__(self, config, options: RunOptions, world, devices, reference_batch: int):
        super().__init__(config, options, world, devices, reference_batch)
        self.data_path = parallel.chief_first(world, lambda: idx.resolve_data_path(options.data_path,
                                                                                         options.dataset))
        self.splits = splits = Splits.of(idx.load(self.data_path), config.validation_size)
        B, image_shape = config.batch_size, splits.data.image_shape  # B on each rank; B * world.size a step
        self.units_per_step = self.global_batch
        self.batch_text = f"batch_size {B}{self.on_ranks}"
        self.steps_per_epoch = splits.steps_per_epoch(self.global_batch, self.batch_text)
        spread_note = None
        if config.spread_layers:
            self.devices, spread_note = local_devices.spread_layers(devices, config.num_layers)
        self.notes = [spread_note] if spread_note else []
        self.plan = make_model_plan(config, image_shape, B, self.devices, options.strategy, options.compute_precision,
                                    options.memory)
        self.trainer = Trainer(config, image_shape, options.seed, self.unrolling(image_shape[0]), self.plan, world,
                               options.fp16_allreduce)
        self.saved_extra = {"global_batch_size": self.global_batch, "image_shape": list(image_shape)}
        self.max_epochs = options.max_epochs or config.num_epochs
        self.curve = Curve("accuracy", f"{splits.title} {options.config_name}", log_scale=False)
        self.order = None

    def data_line(self) -> str:
        return f"data {self.data_path}: {self.splits.describe()}"

    def learning_rate(self, pos) -> float:
        return self.config.learning_rate * parallel.lr_factor(self.lr_ratio, self.options.lr_scaling,
                                                                 pos.global_step, self.options.lr_warmup_steps)

    def begin_epoch(self, pos) -> None:
        self.order = epoch_order(self.options.seed, pos.epoch, len(self.splits.train.labels))

    def step(self, pos, i: int):
        images, labels = self.splits.train_batch(self.order, i, self.global_batch, self.world)
        loss, accuracy, norm, _ = self.trainer.loss_scale.until_applied(  # applied, or diverged
            lambda: self.trainer.train_step(images, labels).numpy(), lambda outputs: outputs[3] == 1.0)
        pos.epoch_loss += float(loss)
        pos.epoch_accuracy += float(accuracy)
        return {"loss": float(loss), "gradient norm": float(norm)}

    def figures(self, pos):
        return (f"train loss {pos.train_loss:.4f} accuracy {100 * pos.train_accuracy:.2f}%",
                {"loss": pos.train_loss, "accuracy": pos.train_accuracy})

    def divergence_advice(self, lr: float) -> str:
        return f"lower --learning_rate (now {lr:g})"

    def validate(self, pos, lr: float):
        checked = evaluate(self.trainer, self.splits.valid, self.splits.pixels, self.world)
        valid = {"valid_loss": checked.loss, "valid_accuracy": checked.accuracy} if checked else {}
        entry = dict({"epoch": pos.epoch + 1, "train_loss": pos.train_loss, "train_accuracy": pos.train_accuracy,
                      "valid_loss": None, "valid_accuracy": None}, **valid, learning_rate=lr)
        text = (f"train loss {pos.train_loss:.4f} accuracy {100 * pos.train_accuracy:.2f}%" +
                (f" | valid loss {checked.loss:.4f} accuracy {100 * checked.accuracy:.2f}%" if checked else ""))
        return entry, text, valid

    def finish(self, pos, speed):
        splits = self.splits
        checked = evaluate(self.trainer, splits.valid, splits.pixels, self.world)
        self.tested = tested = evaluate(self.trainer, splits.data.test, splits.pixels, self.world)  # for the plots
        own = dict(splits.test_metrics(tested), valid_accuracy=checked.accuracy if checked else None,
                   valid_loss=checked.loss if checked else None,
                   train_accuracy=pos.train_accuracy if pos.step_in_epoch else
                   (pos.history[-1]["train_accuracy"] if pos.history else None))
        valid_text = f"valid accuracy {100 * checked.accuracy:.2f}% | " if checked else ""
        text = f"{valid_text}test accuracy {100 * tested.accuracy:.2f}% (loss {tested.loss:.4f})"
        return (own, text, {"test_accuracy": tested.accuracy, "test_loss": tested.loss},
                {"test_accuracy": tested.accuracy})

    def test(self):
        tested = evaluate(self.trainer, self.splits.data.test, self.splits.pixels, self.world)
        return {"test_accuracy": tested.accuracy, "test_loss": tested.loss}

    def plot(self, pos, save_path: str) -> None:
        plots.test_results(save_path, self.splits.data, self.splits.title, self.tested, self.options.config_name)
