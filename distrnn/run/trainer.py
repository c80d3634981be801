"""What every job's trainer is: its model, optimizer and loss scale, where the run stands (a Position saved
with every checkpoint), what rank 0 shares with the other ranks, and the few things the loop asks of it
(set the learning rate, the weights' norm, the parts a checkpoint holds). A job subclasses `Trainer` with
its own Position and step; nothing here knows which job runs."""
import dataclasses
import json
from typing import Optional

import tensorflow as tf

from distrnn.numerics.precision import LossScale


@dataclasses.dataclass
class Position:
    """Where a run stands; saved with every checkpoint so --resume continues exactly. A job's Position adds
    its own sums over the epoch in progress."""
    epoch: int = 0            # 0-based epoch in progress
    step_in_epoch: int = 0    # next step (window, batch) of that epoch
    global_step: int = 0      # training steps done in all
    history: list = dataclasses.field(default_factory=list)  # per finished epoch: its figures and step
    # Each size the run has had: the step it started training at that size and World.shape (processes,
    # engine); a run resumed on another number of ranks adds one.
    sizes: list = dataclasses.field(default_factory=list)

    def note_size(self, shape: dict) -> Optional[dict]:
        """Records the size the run goes on at (World.shape); returns the one it had before where that differs."""
        last = self.sizes[-1] if self.sizes else None
        if last is None or {k: v for k, v in last.items() if k != "step"} != shape:
            self.sizes.append(dict(step=self.global_step, **shape))
            return last
        return None

    def next_epoch(self) -> None:
        """On to the next epoch's first step, the job's own sums back to their start."""
        shared = {field.name for field in dataclasses.fields(Position)}
        for field in dataclasses.fields(self):
            if field.name not in shared:
                setattr(self, field.name, field.default)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0


class Trainer(tf.Module):
    """A job's model, optimizer and loss scale, and its position; `position_cls` is the job's Position."""

    position_cls = Position
    # The loss scale came after runs were saved without one: those resume with its initial value.
    optional_parts = (LossScale.PART,)

    def __init__(self, model, optimizer, world):
        super().__init__(name="trainer")
        self.model, self.optimizer, self.world = model, optimizer, world
        self.loss_scale = LossScale.for_precision(model.unrolling.precision)
        self._position = tf.Variable(json.dumps(dataclasses.asdict(self.position_cls())), dtype=tf.string,
                                     trainable=False)

    @property
    def unrolling(self):
        return self.model.unrolling

    def checkpoint_parts(self) -> dict:
        """What a checkpoint holds, by name (distrnn.run.checkpoints.Checkpoints)."""
        return {"model": self.model, "optimizer": self.optimizer, "position": self._position,
                LossScale.PART: self.loss_scale, **self.own_parts()}

    def own_parts(self) -> dict:
        """What a job's checkpoint holds beyond the model, optimizer, position and loss scale."""
        return {}

    def shared_variables(self) -> list:
        """What rank 0 gives every rank beyond the model, optimizer and loss scale (generators, state)."""
        return []

    def record(self, position) -> None:
        """Copies where the run stands into the checkpointed variable."""
        self._position.assign(json.dumps(dataclasses.asdict(position)))

    def position(self):
        return self.position_cls(**json.loads(self._position.numpy().decode()))

    def share_from_chief(self) -> None:
        """After rank 0 restored (or initialised) the run: every rank takes its weights, the optimizer's
        slots, the loss scale, the job's shared variables and the position."""
        if self.world.size == 1:
            return
        self.world.broadcast_variables(list(self.model.variables) + list(self.optimizer.variables) +
                                       self.shared_variables() + list(self.loss_scale.variables))
        self._position.assign(self.world.broadcast_object(self._position.numpy()))

    def set_learning_rate(self, rate: float) -> None:
        self.optimizer.learning_rate.assign(rate)

    def weights_norm(self) -> float:
        return float(tf.linalg.global_norm(self.model.trainable_variables))

