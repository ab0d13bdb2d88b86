import sys

from keras_we.experiments.cli import main

sys.exit(main())
