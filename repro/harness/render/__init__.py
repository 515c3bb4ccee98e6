"""Renderers: markdown tables + CSV (``tables.py``) and figures (``figures.py``). They read the run store and
the specs (the ledger), never the trainer."""
