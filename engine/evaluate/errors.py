"""The one exception the evaluation package raises for bad input."""


class EvaluationError(ValueError):
    """Bad evaluation input (unknown task, haystack too small, tokenizer that does not fit the
    model, ...). The message names the value and the fix; a command turns it into exit code 2."""
