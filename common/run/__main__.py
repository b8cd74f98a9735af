"""``python -m common.run``: one experiment from the command line (:func:`common.run.experiment.main`)."""

from common.run.experiment import main

main()
