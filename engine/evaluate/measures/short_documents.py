"""Short-document loss: the token-weighted mean loss of held-out documents shorter than the
position length (did short-context ability survive long-context training?)."""
from __future__ import annotations

from typing import Optional

from data_tools.indexed import IndexedReader
from engine.evaluate import hf_model
from engine.evaluate.engine_eval import short_document_loss
from engine.evaluate.inputs import short_document_ids
from engine.evaluate.measures import Flag, Measure, MeasureRequest, Prepared, short_limit
from engine.evaluate.position_loss import MeanLossAccumulator


class PreparedShortDocuments(Prepared):
    def __init__(self, reader: IndexedReader, documents: list[int], limit: int,
                 max_documents: int):
        self.reader, self.documents = reader, documents
        self.limit, self.max_documents = limit, max_documents
        self.longest = limit

    def run_engine(self, chunks, plan, trained_context, progress):
        return short_document_loss(chunks, plan, self.reader, self.limit, self.max_documents)

    def run_hf(self, model, scoring, progress):
        short = MeanLossAccumulator()
        for i in self.documents:
            short.add(hf_model.token_losses(model, self.reader.get(i)))
        return short

    def contribute(self, report, result) -> None:
        report.short_document_loss = result.result() if result.tokens else None


class ShortDocuments(Measure):
    name = "short_document_loss"
    order = 30
    asked = "--short-documents"
    flags = (Flag("short_documents", "--short-documents", {
        "metavar": "PREFIX", "help": "indexed dataset for the short-document loss"}),)

    def prepare(self, request: MeasureRequest) -> Optional[PreparedShortDocuments]:
        section = request.section
        if not section.short_documents:
            return None
        reader = IndexedReader(section.short_documents)
        limit = short_limit(section)
        documents = short_document_ids(reader, section.short_documents, limit,
                                       section.max_short_documents, request.names)
        return PreparedShortDocuments(reader, documents, limit, section.max_short_documents)


MEASURE = ShortDocuments()
