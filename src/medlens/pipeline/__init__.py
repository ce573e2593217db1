"""One path from a file (or a tensor) to a written result, for every front end: the CLI, `evaluate`, the demo,
the batch runner and the web app. `plan` checks a request once; `run` reads, prepares and explains; `write` saves.
"""
from medlens.pipeline.plan import ExplainRequest, Plan, WorkerRecipe, plan_for
from medlens.pipeline.run import (Outcome, PendingOutcomes, explain_batch, explain_file, explain_pending,
                                  explain_prepared, explain_prepared_many, explain_tensor, read_input, read_with_shape, split_result)
from medlens.pipeline.write import write_outcome

__all__ = ["ExplainRequest", "Outcome", "PendingOutcomes", "Plan", "explain_batch", "explain_file", "explain_pending",
           "explain_prepared", "explain_prepared_many", "explain_tensor", "plan_for", "read_input", "read_with_shape", "split_result",
           "write_outcome", "WorkerRecipe"]
