"""Short-document loss: the token-weighted mean loss of held-out documents shorter than the
position length (did short-context ability survive long-context training?)."""
from __future__ import annotations

from typing import Optional

from data_tools.indexed import IndexedReader
from engine.evaluate.engine_eval import short_document_loss
from engine.evaluate.inputs import short_document_ids
from engine.evaluate.measures import Flag, Measure, MeasureRequest, short_limit
from engine.evaluate.measures.documents import PreparedDocuments
from engine.evaluate.position_loss import MeanLossAccumulator


class PreparedShortDocuments(PreparedDocuments):
    read_length_is_limit = False  # every document is shorter than the limit: read it whole

    def new_accumulator(self):
        return MeanLossAccumulator()

    def run_engine(self, chunks, plan, trained_context, progress):
        return short_document_loss(chunks, plan, self.reader, self.documents, self.length)

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
        return PreparedShortDocuments(reader, documents, limit)


MEASURE = ShortDocuments()
