"""The PTB word language model as a training job: `run(config, options)` is the whole of it;
`python -m distrnn.ptb` only parses flags and calls it, and the tests call it the same way.
"""

from distrnn import parallel
from distrnn.ptb import reader
from distrnn.ptb.configs import RunOptions
from distrnn.ptb.trainer import LeanerOnOOM, Trainer, evaluate, learning_rate, make_model_plan, perplexity
from distrnn.run import start
from distrnn.run.job import Curve, Job, Measures

# Fields that fix variable shapes or the meaning of a saved data position: a checkpoint cannot be resumed
# under different values. The global batch, not each rank's share of it: a run goes on on another number of
# ranks (the data order, the carried state's rows and the dropout masks follow the global batch).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_steps", "tie_embeddings")


def run(config, options: RunOptions, world=None) -> dict:
    """A run of this job: trains, validates every epoch, tests at the end; returns the metrics dict (with
    metrics["interrupted"] the exit code of a stop, after its checkpoint). See distrnn.run.start.run."""
    return start.run(PTBJob, config, options, world)


class PTBJob(Job):
    """The PTB language model as the training loop sees it: windows of the token stream, the LSTM state
    carried from one window to the next, perplexities."""

    name, shape_fields = "ptb", SHAPE_FIELDS + ("vocab_size", "global_batch_size")
    absent_fields = {"tie_embeddings": False}  # config.json of runs from before the field
    measures = Measures("words", "words_per_sec", "valid_perplexity", higher_is_better=False,
                        test_keys=("test_perplexity",))

    def __init__(self, config, options: RunOptions, world, devices, reference_batch: int):
        super().__init__(config, options, world, devices, reference_batch)
        self.data_path = parallel.chief_first(world, lambda: reader.resolve_data_path(options.data_path))
        self.data = data = reader.load(self.data_path)
        B, T = config.batch_size, config.num_steps  # B rows on each rank; B * world.size rows in all
        self.units_per_step = self.global_batch * T
        self.batch_text = f"batch_size x num_steps = {B} x {T}{self.on_ranks}"
        self.batches = reader.rank_batches(data, self.global_batch, T, world, self.batch_text)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.plan = make_model_plan(config, data.vocab_size, devices, options.strategy, options.compute_precision,
                                    options.memory)
        self.trainer = Trainer(config, data.vocab_size, options.seed, self.unrolling(config.num_steps), self.plan,
                               world, options.sparse_as_dense, options.fp16_allreduce)
        self.guarded_step = LeanerOnOOM(self.trainer, self.on_gpu, world, retry=options.on_oom == "retry")
        self.memory_note = ", leaner on running out of memory (--on_oom retry)" * self.guarded_step.retry
        self.saved_extra = {"vocab_size": data.vocab_size, "global_batch_size": self.global_batch}
        self.max_epochs = min(options.max_epochs or config.max_max_epoch, config.max_max_epoch)
        self.curve = Curve("perplexity", f"PTB {options.config_name}")
        self.state, self.loss = None, None

    def data_line(self) -> str:
        return f"data {self.data_path}: {self.data.describe()}"

    def learning_rate(self, pos) -> float:
        return learning_rate(self.config, pos.epoch, pos.global_step, self.lr_ratio, self.options.lr_scaling,
                             self.options.lr_warmup_steps)

    def begin_epoch(self, pos) -> None:
        self.state = (self.trainer.carried_state() if pos.step_in_epoch
                      else self.trainer.model.zero_state(self.config.batch_size))

    def step(self, pos, i: int):
        x, y = reader.train_window(self.batches.train_rows, self.config.num_steps, i)
        loss, norm, _, self.state = self.guarded_step(pos.global_step + 1, x, y, self.state)  # applied, or diverged
        self.loss = loss = float(loss)
        pos.epoch_cost += loss
        pos.epoch_iters += self.config.num_steps
        return {"loss": loss, "perplexity": perplexity(loss / self.config.num_steps), "gradient norm": float(norm)}

    def figures(self, pos):
        return (f"train ppl {pos.train_perplexity:8.2f}",
                {"loss": self.loss / self.config.num_steps, "perplexity": pos.train_perplexity})

    def divergence_advice(self, lr: float) -> str:
        c = self.config
        return (f"lower --learning_rate (now {lr:g}), --max_grad_norm ({c.max_grad_norm:g}) or --init_scale "
                f"({c.init_scale:g})")

    def record(self, pos, end_of_epoch: bool) -> None:
        self.trainer.record(pos)
        self.trainer.record_state(self.trainer.model.zero_state(self.config.batch_size) if end_of_epoch else self.state)

    def validate(self, pos, lr: float):
        valid_ppl = evaluate(self.trainer, self.batches.valid, self.world)
        entry = {"epoch": pos.epoch + 1, "train_perplexity": pos.train_perplexity, "valid_perplexity": valid_ppl,
                 "learning_rate": lr}
        text = f"train ppl {pos.train_perplexity:.2f} | valid ppl {valid_ppl:.2f}"
        return entry, text, {"valid_perplexity": valid_ppl}

    def finish(self, pos, speed):
        # At an epoch's end (this run's, or the checkpoint's it resumed from) the last validation figure
        # describes these weights; after a part of an epoch they have moved on.
        valid_ppl = (pos.history[-1]["valid_perplexity"] if pos.history and pos.step_in_epoch == 0
                     else evaluate(self.trainer, self.batches.valid, self.world))
        test_ppl = self.test()["test_perplexity"]
        train_ppl, data = pos.train_perplexity, self.data
        own = {"train_perplexity": train_ppl, "valid_perplexity": valid_ppl, "test_perplexity": test_ppl,
               "vocab_size": data.vocab_size, "oov": data.oov,
               "words": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)}}
        text = f"train ppl {train_ppl:.2f} | valid ppl {valid_ppl:.2f} | test ppl {test_ppl:.2f}"
        return own, text, {"test_perplexity": test_ppl}, {"test_perplexity": test_ppl}

    def test(self):
        return {"test_perplexity": evaluate(self.trainer, self.batches.test, self.world)}

    def write_run_files(self, save_path: str) -> None:
        reader.save_vocab(save_path, self.data.vocab)

    def memory_metrics(self, monitor):
        return dict(monitor, mode=self.trainer.unrolling.memory.describe(), changes=self.guarded_step.changes)
