"""The offline toy world of ``prefopt demo``: ``world`` (language, generator, scorer), ``sft``
(the reference model), ``run`` (the experiment and its report)."""
