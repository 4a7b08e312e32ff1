"""Evaluation scored exactly as lm-evaluation-harness scores it.

* :mod:`lmforge.eval.scorer`: loglikelihood, rolling loglikelihood and greedy generation on any causal LM.
* :mod:`lmforge.eval.tasks`: the built-in tasks (lambada, boolq, race, piqa, hellaswag, winogrande,
  wikitext2, wikitext103) and user tasks from YAML.
* :mod:`lmforge.eval.data`: task records from local files, a prefetch cache, or the Hub.
* :mod:`lmforge.eval.evaluate`: the stage (``run``), results tables and ``compare``.
* :mod:`lmforge.eval.harness`: the ``lmforge`` model for ``lm_eval --model lmforge``.
"""

from lmforge.eval.evaluate import compare, evaluate_model, run
from lmforge.eval.scorer import Scorer, rolling_windows
from lmforge.eval.tasks import get_task, known_tasks

__all__ = ["run", "evaluate_model", "compare", "Scorer", "rolling_windows", "get_task", "known_tasks"]
