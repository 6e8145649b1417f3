"""Train a model, or resume the run in --workdir: `python train.py --help` says how. The command
is `transformer.cli.train`."""

from transformer.cli.train import main

if __name__ == "__main__":
    main()
