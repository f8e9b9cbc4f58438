"""What the two loss measures over held-out documents share: an indexed dataset, the documents
picked from it (the engine and a Hugging Face model score the same ones), how many tokens of
each are read, and on a Hugging Face model one forward per document into the measure's
accumulator. (No MEASURE here: the registry skips this module.)"""
from __future__ import annotations

from data_tools.indexed import IndexedReader
from engine.evaluate import hf_model
from engine.evaluate.measures import Prepared


class PreparedDocuments(Prepared):
    """``length``: loss by position reads the first ``length`` tokens of each document; short
    documents are shorter than ``length`` and are read whole (``read_length_is_limit = False``).
    Subclasses give ``new_accumulator``, ``run_engine`` and ``contribute``."""
    read_length_is_limit = True

    def __init__(self, reader: IndexedReader, documents: list[int], length: int):
        self.reader, self.documents, self.length = reader, documents, length
        self.longest = length

    def new_accumulator(self):
        raise NotImplementedError

    def run_hf(self, model, scoring, progress):
        accumulator = self.new_accumulator()
        for i in self.documents:
            tokens = (self.reader.get(i, 0, self.length) if self.read_length_is_limit
                      else self.reader.get(i))
            accumulator.add(hf_model.token_losses(model, tokens))
        return accumulator
