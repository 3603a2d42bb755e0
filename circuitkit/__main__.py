"""``python -m circuitkit`` (what ``torchrun -m circuitkit`` starts on each rank): the command line."""
import sys

from circuitkit.cli import main

sys.exit(main())
