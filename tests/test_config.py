import dataclasses
import re

import pytest

from distrnn.config import override
from distrnn.errors import UsageError
from distrnn.ptb.configs import PRESETS, PUBLISHED, PTBConfig


def test_presets_have_reference_values():
    small, medium, large = (PRESETS.get(n) for n in ("small", "medium", "large"))
    assert (small.num_layers, small.hidden_size, small.num_steps, small.keep_prob, small.max_max_epoch) == (2, 200, 20, 1.0, 13)
    assert (medium.hidden_size, medium.num_steps, medium.keep_prob, medium.lr_decay, medium.init_scale) == (650, 35, 0.5, 0.8, 0.05)
    assert (large.hidden_size, large.keep_prob, large.max_grad_norm, large.max_max_epoch) == (1500, 0.35, 10.0, 55)
    assert large.lr_decay == pytest.approx(1 / 1.15)
    assert PRESETS.names() == ["large", "medium", "small", "test"]
    assert {n: PUBLISHED[n][0] for n in ("small", "medium", "large")} == {"small": 115.91, "medium": 82.07, "large": 78.29}


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS.get("small").hidden_size = 10


def test_override_parses_types():
    c = override(PRESETS.get("small"), {"hidden_size": "100", "keep_prob": "0.5", "rnn_mode": "static"})
    assert (c.hidden_size, c.keep_prob, c.rnn_mode) == (100, 0.5, "static")
    assert PRESETS.get("small").hidden_size == 200  # the preset itself is unchanged
    assert override(PRESETS.get("small"), {"learning_rate": 2}).learning_rate == 2.0


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_sise": "100"}, "unknown config field 'hidden_sise'"),
    ({"hidden_size": "1.5"}, "--hidden_size takes an integer, got '1.5'"),
    ({"keep_prob": "half"}, "--keep_prob takes a number, got 'half'"),
    ({"hidden_size": "0"}, "hidden_size must be positive, got 0"),
    ({"batch_size": "-3"}, "batch_size must be positive, got -3"),
    ({"keep_prob": "1.5"}, "keep_prob must be in"),
    ({"rnn_mode": "magic"}, "rnn_mode must be one of static, dynamic, block, cudnn, auto"),
    ({"cell": "gru", "use_peepholes": "true"}, "use_peepholes needs cell lstm"),
    ({"cell": "gru", "rnn_mode": "block"}, "rnn_mode block runs LSTM cells only"),
    ({"use_peepholes": "yes", "rnn_mode": "cudnn"}, "cuDNN has no peephole LSTM"),
    ({"use_peepholes": "maybe"}, "--use_peepholes takes bool (true or false), got 'maybe'"),
    ({"num_layers": True}, "takes int"),
])
def test_override_errors(overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        override(PRESETS.get("small"), overrides)


def test_unknown_preset():
    with pytest.raises(UsageError, match="unknown --config 'huge'; choose one of: large, medium, small, test"):
        PRESETS.get("huge")


def test_learning_rate_schedule():
    c = PTBConfig(learning_rate=1.0, max_epoch=4, lr_decay=0.5)
    assert [c.learning_rate_at(e) for e in range(7)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]
