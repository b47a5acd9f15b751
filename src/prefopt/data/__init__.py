"""Data: sources -> formats -> one record type (PreferencePair) -> tokenized pairs -> batches."""

from prefopt.data.formats import load_pairs
from prefopt.data.records import PreferencePair
from prefopt.data.sources import RawRows, read_rows

__all__ = ["PreferencePair", "RawRows", "load_pairs", "read_rows"]
