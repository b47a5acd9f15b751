"""``prefopt online``: iterative / online DPO and ODPO (sample, score, pair, train, repeat)."""
