"""Loss by position: the mean next-token loss over log2 position buckets of the first
eval.position_length tokens of long held-out documents (does more context help?)."""
from __future__ import annotations

from typing import Optional

from data_tools.indexed import IndexedReader
from engine.evaluate.engine_eval import position_losses
from engine.evaluate.errors import EvaluationError
from engine.evaluate.inputs import long_document_ids
from engine.evaluate.measures import Flag, Measure, MeasureRequest
from engine.evaluate.measures.documents import PreparedDocuments
from engine.evaluate.position_loss import PositionLossAccumulator


class PreparedPositionLoss(PreparedDocuments):
    def new_accumulator(self):
        return PositionLossAccumulator(self.length)

    def run_engine(self, chunks, plan, trained_context, progress):
        buckets, _ = position_losses(chunks, plan, self.reader, self.documents, self.length,
                                     trained_context)
        return buckets

    def contribute(self, report, result) -> None:
        report.position_loss = result.buckets()


class PositionLoss(Measure):
    name = "position_loss"
    order = 20
    asked = "--long-documents (loss by position)"
    flags = (
        Flag("long_documents", "--long-documents", {"metavar": "PREFIX",
                                                    "help": "indexed dataset for loss by "
                                                            "position"}),
        Flag("position_length", "--position-length", {"type": int,
                                                      "help": "tokens per long document"}),
        Flag("max_documents", "--max-documents", {"type": int}),
    )

    def prepare(self, request: MeasureRequest) -> Optional[PreparedPositionLoss]:
        section, names = request.section, request.names
        if not section.long_documents:
            return None
        if section.position_length < 2:
            raise EvaluationError(f"{names['long_documents']} needs {names['position_length']} "
                                  f"(tokens per document)")
        reader = IndexedReader(section.long_documents)
        # A measure no document fits is refused now, not after the models ran.
        documents = long_document_ids(reader, section.long_documents, section.position_length,
                                      section.max_documents, names)
        return PreparedPositionLoss(reader, documents, section.position_length)


MEASURE = PositionLoss()
