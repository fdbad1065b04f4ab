"""Train a transformer: python train.py --config configs/X.yaml --mesh meshes/Y.yaml [key=value ...]"""

import sys

from shardlib.training.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
