"""Trains PTB windows as distrnn.ptb does and records, after every step, the loss and how far
apart the ranks' weights are. Run by tests/test_horovod.py, under horovodrun and alone:

    python tests/replica_steps.py CORPUS_DIR OUT_JSON GLOBAL_BATCH STEPS

Rank 0 writes OUT_JSON: {"steps": [{"loss", "max_replica_difference"}, ...], "weights": {name: values}}.
"""
import json
import os
import sys

import numpy as np

# This checkout's distrnn, wherever an installed one points (a script's own directory comes first on sys.path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrnn import parallel  # noqa: E402
from distrnn.config import override  # noqa: E402
from distrnn.parallel import per_rank_config  # noqa: E402
from distrnn.ptb import reader  # noqa: E402
from distrnn.ptb.configs import PRESETS  # noqa: E402
from distrnn.ptb.trainer import Trainer  # noqa: E402


def main(corpus, out, global_batch, steps):
    world = parallel.init()
    config = override(PRESETS.get("test"), {"hidden_size": "8", "num_layers": "2", "num_steps": "5",
                                            "keep_prob": "1.0", "max_grad_norm": "5"})
    config = per_rank_config(config, global_batch, world)
    data = reader.load(corpus)
    trainer = Trainer(config, data.vocab_size, seed=3, world=world)
    trainer.share_from_chief()
    rows = world.stripe(reader.train_rows(data.train, global_batch))
    state = trainer.model.zero_state(config.batch_size)
    variables = trainer.model.trainable_variables
    record = []
    for i, x, y in reader.train_windows(rows, config.num_steps):
        if i == steps:
            break
        loss, _, _, state = trainer.train_step(x, y, state)
        mine = np.concatenate([v.numpy().ravel() for v in variables])
        every_rank = world.allgather(mine[None])                     # (ranks, parameters)
        record.append({"loss": float(loss), "max_replica_difference": float(np.abs(every_rank - mine).max())})
    if world.is_chief:
        with open(out, "w") as f:
            json.dump({"world_size": world.size, "steps": record,
                       "weights": {v.name: v.numpy().tolist() for v in variables}}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
