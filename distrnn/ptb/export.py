"""`python -m distrnn.ptb.export` (also `distrnn-export`): a trained PTB model as a TensorFlow SavedModel.

    python -m distrnn.ptb.export --save_path RUN --export_dir DIR [--checkpoint best|last]

The SavedModel needs nothing of distrnn to be loaded (`tf.saved_model.load(DIR)`) and holds:
  - `step(ids, state)`: ids (B, T) int32 and state (layers, S, B, H) float32 (S = 2 for LSTM: c, h;
    1 for GRU and RNN) -> {"log_probs": (B, T, vocabulary) natural-log probabilities of each next
    word, "state": the state after the T steps};
  - `initial_state(batch_size)` -> {"state": zeros};
  - `serving_default(ids)`: step from the initial state;
  - the vocabulary as an asset, `vocabulary` (`vocab.txt`: one word a line in id order; `.asset_path`).
"""
import os
import sys

from distrnn import cli
from distrnn.run import files


def build_parser():
    parser = cli.ArgumentParser(prog="python -m distrnn.ptb.export", description=__doc__.split("\n\n")[0])
    cli.add_saved_run_flags(parser)
    parser.add_argument("--export_dir", required=True, help="a new directory for the SavedModel")
    return parser


def export(args) -> str:
    from distrnn.ptb import saved_run
    target = files.check_new_directory(args.export_dir, "--export_dir")
    run = saved_run.load(args.save_path, args.checkpoint, args.data_path, num_steps=None)
    saved_run.say_notes(run, "distrnn.ptb.export")
    saved_run.export(run, target)
    return target


def main(argv=None) -> int:
    def run():
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        cli.load_tensorflow()
        print(f"exported {args.save_path} to {export(args)}")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return cli.run_main("distrnn.ptb.export", run)


if __name__ == "__main__":
    sys.exit(main())
