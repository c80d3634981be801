"""A trained PTB run, read back to be used: its config, vocabulary and weights (the last checkpoint or the
best epoch's), on whatever this machine has. What `distrnn.ptb.generate`, `score` and `export` share.

The model is rebuilt on one device of TensorFlow's choice, whatever devices and ranks the run trained on
(placement changes where variables live, not what they hold), and unrolled in the mode `auto` picks here
(a run trained with cuDNN on GPUs reads on a CPU). Horovod is never imported.
"""
import dataclasses
import functools
import json
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from distrnn.errors import UsageError
from distrnn.parallel import local_devices
from distrnn.ptb import reader
from distrnn.ptb.configs import PTBConfig
from distrnn.ptb.model import PTBModel
from distrnn.ptb.trainer import perplexity
from distrnn.rnn import Unrolling
from distrnn.run import files
from distrnn.run.checkpoints import Unfit, op_error_reason, read_config, restore_newest

CHECKPOINTS = {"last": "checkpoints", "best": "best"}  # --checkpoint: the directory in the save path


@dataclasses.dataclass
class SavedRun:
    save_path: str
    config: PTBConfig
    vocab: Dict[str, int]      # word -> id
    words: List[str]           # id -> word
    model: PTBModel
    checkpoint: str            # the path restored
    eval_batch: int            # rows of the run's evaluation (its global batch)
    notes: List[str] = dataclasses.field(default_factory=list)  # checkpoints skipped as partial or damaged

    @functools.cached_property
    def position(self) -> dict:
        """Where the run stood when the checkpoint was saved: its epoch (0-based, the one in progress),
        global step and history."""
        return json.loads(tf.train.load_variable(self.checkpoint, "position/.ATTRIBUTES/VARIABLE_VALUE"))

    def describe(self) -> str:
        """`ckpt-40 (step 40, after epoch 2)`: which weights these are."""
        pos = self.position
        within = f"after epoch {pos['epoch']}" if not pos["step_in_epoch"] else \
            f"epoch {pos['epoch'] + 1}, step {pos['step_in_epoch']} of it"
        return f"{self.checkpoint} (step {pos['global_step']}, {within})"

    @property
    def eos(self) -> int:
        return self.vocab[reader.EOS]

    @functools.cached_property
    def token_losses(self):
        """(x, y, state) -> each token's loss (B, T) and the new state; traced once for the run."""
        return tf.function(lambda x, y, state: _token_losses(self.model, x, y, state))

    @functools.cached_property
    def next_logits(self):
        """(x (B, 1), state) -> the logits of the next word and the new state."""
        return tf.function(lambda x, state: _next_logits(self.model, x, state))


def load(save_path: str, which: str = "last", data_path: Optional[str] = None, num_steps: Optional[int] = None
         ) -> SavedRun:
    """The run in `save_path` with the weights of its `which` checkpoint (last or best). data_path: the
    data it trained on, to rebuild a vocab.txt it lacks (a run from before distrnn kept one). num_steps:
    the sequence length the model will be run on (None: any; unrolled dynamically)."""
    files.check_tensorflow_path(save_path, "--save_path")
    settings = _run_config(save_path)
    vocab_size = settings.pop("vocab_size")
    config = PTBConfig(**{f.name: settings[f.name] for f in dataclasses.fields(PTBConfig) if f.name in settings})
    config.validate()
    vocab = _vocabulary(save_path, vocab_size, data_path)
    mode = Unrolling.for_config(config, num_steps, local_devices.runs_on_gpu([]), mode="auto")
    model = PTBModel(config, vocab_size, mode, seed=0)
    directory = os.path.join(save_path, CHECKPOINTS[which])
    try:
        number, notes = restore_newest(directory, lambda prefix: tf.train.Checkpoint(model=model).restore(
            prefix).expect_partial().assert_existing_objects_matched(), "its config.json may have been edited or "
            "replaced: restore the run's own")
    except Unfit:
        raise
    except UsageError as e:
        hint = " (a best checkpoint is saved after the first epoch's validation)" if which == "best" else ""
        other = "last" if which == "best" else "best"
        raise UsageError(f"{e}{hint}; train the run further, or pass --checkpoint {other}") from None
    batch = settings.get("global_batch_size") or config.batch_size
    return SavedRun(save_path, config, vocab, sorted(vocab, key=vocab.get), model,
                    os.path.join(directory, f"ckpt-{number}"), int(batch), notes)


def say_notes(run: SavedRun, prog: str) -> None:
    """What load skipped to reach the checkpoint it read, on stderr (the commands' stdout is their output)."""
    for note in run.notes:
        print(f"{prog}: note: {note}", file=sys.stderr)


def _run_config(save_path: str) -> dict:
    if not os.path.isdir(save_path):
        raise UsageError(f"--save_path {save_path} is not a directory: give the --save_path of a PTB training run")
    settings = read_config(save_path)
    if settings is None:
        raise UsageError(f"{save_path} holds no config.json: it is not the save path of a training run")
    if "vocab_size" not in settings or "image_shape" in settings:
        raise UsageError(f"{save_path} is not a PTB run (its config.json is another job's): give the --save_path of "
                         "a python -m distrnn.ptb run")
    return dict(settings)


def _vocabulary(save_path: str, vocab_size: int, data_path: Optional[str]) -> Dict[str, int]:
    """The run's vocab.txt, or the vocabulary of the data it trained on (--data_path: rebuilt in memory;
    the run's own files are written by the run alone)."""
    if data_path is None:
        return reader.read_vocab(save_path, vocab_size)
    vocab = reader.load(data_path).vocab
    if len(vocab) != vocab_size:
        raise UsageError(f"--data_path {data_path} gives a vocabulary of {len(vocab)} words, the run's model has "
                         f"{vocab_size}: pass the data the run trained on")
    return vocab


# --- scoring ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Score:
    words: int                 # tokens predicted, <eos> included (as perplexity counts them)
    log_prob: float            # natural log of their probability
    oov: int                   # words mapped to <unk>
    lines: list                # per line: (log_prob, words)

    @property
    def perplexity(self) -> float:
        return perplexity(-self.log_prob / self.words)


def score_words(run: SavedRun, words: List[str]) -> Score:
    """Scores a text (its words, <eos> ending each line) as training evaluates a split: every token a
    target once, the stream laid out in the run's evaluation rows, the state carried from window to
    window (and so from line to line within a row)."""
    ids, oov = reader.to_ids(words, run.vocab)
    batches = reader.eval_batches(ids, run.eos, run.eval_batch, run.config.num_steps)
    state = run.model.zero_state(batches.inputs.shape[0])
    losses = np.zeros(batches.inputs.shape, np.float64)
    for i in range(batches.num_windows):
        x, y, _ = batches.window(i)
        window_losses, state = run.token_losses(x, y, state)
        losses[:, i * batches.num_steps:(i + 1) * batches.num_steps] = window_losses.numpy()
    per_token = losses[batches.weights > 0]  # row by row: the stream's order
    ends = np.flatnonzero(ids == run.eos) + 1  # each line's tokens end with its <eos>
    bounds = [0, *ends] if len(ends) and ends[-1] == len(ids) else [0, *ends, len(ids)]
    lines = [(-float(per_token[a:b].sum()), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
    return Score(len(ids), -float(per_token.sum()), oov, lines)


def _token_losses(model: PTBModel, x, y, state):
    """Each token's loss (B, T) and the new state."""
    features, state = model(x, state, training=False)
    losses = tf.reshape(model.token_losses(features, y), [tf.shape(x)[1], tf.shape(x)[0]])  # time-major
    return tf.transpose(losses), state


# --- generation ------------------------------------------------------------------------------------

def sample(run: SavedRun, prompt: List[int], count: int, temperature: float, seed: Optional[int]) -> List[int]:
    """`count` word ids drawn one at a time from the model's distribution (its logits divided by
    `temperature`), after reading `prompt` (ids; the model starts from <eos>, a sentence's start)."""
    step, rng = run.next_logits, np.random.default_rng(seed)
    state = run.model.zero_state(1)
    logits = None
    for word in [run.eos] + prompt:
        logits, state = step(tf.constant([[word]], tf.int32), state)
    drawn = []
    for _ in range(count):
        logits64 = logits.numpy().astype(np.float64)[0]
        # Shifted first: every value <= 0, so a tiny temperature gives -inf (probability 0), never inf - inf.
        with np.errstate(over="ignore"):
            p = np.exp((logits64 - logits64.max()) / temperature)
        word = int(rng.choice(len(p), p=p / p.sum()))
        drawn.append(word)
        logits, state = step(tf.constant([[word]], tf.int32), state)
    return drawn


def _next_logits(model: PTBModel, x, state):
    features, state = model(x, state, training=False)
    return model.logits(features), state


# --- export ----------------------------------------------------------------------------------------

class Exported(tf.Module):
    """What the SavedModel holds: the model, its vocabulary, and functions over one flat state tensor
    (layers, S, B, H), since a signature takes tensors, not nested tuples."""

    def __init__(self, run: SavedRun, vocab_file: str):
        super().__init__(name="ptb_language_model")
        self.model = run.model
        self.vocabulary = tf.saved_model.Asset(vocab_file)  # copied into the SavedModel's assets/
        self.layers = run.config.num_layers
        self.per_layer = len(run.model.zero_state(1)[0])
        self.units = run.config.hidden_size
        ids = tf.TensorSpec([None, None], tf.int32, name="ids")
        state = tf.TensorSpec([self.layers, self.per_layer, None, self.units], tf.float32, name="state")
        self.step = tf.function(self._step, input_signature=[ids, state])
        self.initial_state = tf.function(self._initial_state,
                                         input_signature=[tf.TensorSpec([], tf.int32, name="batch_size")])
        self.serving_default = tf.function(lambda ids: self._step(ids, self._initial_state(tf.shape(ids)[0])["state"]),
                                           input_signature=[ids])

    def _step(self, ids, state):
        nested = tuple(tuple(state[l, s] for s in range(self.per_layer)) for l in range(self.layers))
        features, new = self.model(ids, nested, training=False)
        log_probs = tf.nn.log_softmax(self.model.logits(features))  # (T*B, V), time-major
        batch, steps = tf.shape(ids)[0], tf.shape(ids)[1]
        log_probs = tf.transpose(tf.reshape(log_probs, [steps, batch, -1]), [1, 0, 2])
        return {"log_probs": log_probs, "state": tf.stack([tf.stack(layer) for layer in new])}

    def _initial_state(self, batch_size):
        return {"state": tf.zeros([self.layers, self.per_layer, batch_size, self.units])}


def export(run: SavedRun, export_dir: str) -> None:
    """The SavedModel, complete at export_dir (checked by files.check_new_directory) or absent: written
    beside it, then renamed; a full disk is SaveFailed (74). Its vocabulary asset is the run's words,
    written apart from the run's own files."""
    import tempfile
    with files.new_directory(export_dir, tf.errors.OpError, op_error_reason) as tmp:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(export_dir), prefix=".vocab-") as scratch:
            vocab_file = os.path.join(scratch, reader.VOCAB_FILE)
            files.write_text(vocab_file, "".join(f"{word}\n" for word in run.words))
            module = Exported(run, vocab_file)
            tf.saved_model.save(module, tmp, signatures={"step": module.step, "initial_state": module.initial_state,
                                                         "serving_default": module.serving_default},
                                options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
