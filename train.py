"""Train a model: `python train.py [--config=configs/NAME.py] [--workdir=DIR] [--config.KEY=VALUE]`."""

import sys

if __name__ == "__main__":
    sys.exit("train.py: the training loop is not built yet (see the training issue).")
