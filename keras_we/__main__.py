import sys

from keras_we.cli import main

sys.exit(main())
