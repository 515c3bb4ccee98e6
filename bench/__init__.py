"""The KD training throughput tool (``python -m bench``, ``make bench``); outside the ``repro`` package because
nothing in the suite imports it. Results go to ``bench/results.json``."""
