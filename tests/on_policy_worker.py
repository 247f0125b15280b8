"""`align run` with the test on-policy objective and generation backend registered in-process,
for torchrun to start on each process: ``python on_policy_worker.py <align run args>``."""

import sys

from reinforce_plugin import FixedCompletions, Reinforce

from align.cli import cli
from align.testing import registered

if __name__ == "__main__":
    with registered(Reinforce(), FixedCompletions(), only=True):
        cli.main(["run", *sys.argv[1:]], standalone_mode=True)
