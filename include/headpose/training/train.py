"""SageMaker script-mode entry script: ``python train.py --<hyperparameter> <value> ...``.

In ``sourcedir.tar.gz`` this file sits at the root beside the ``headpose`` package, so
the toolkit's working directory (the code folder, first on ``sys.path``) makes
``headpose.training`` importable without installing anything.
"""
import sys

from headpose.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
