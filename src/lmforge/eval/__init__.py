"""Evaluation scored exactly as lm-evaluation-harness scores it.

* :mod:`lmforge.eval.scorer`: loglikelihood, rolling loglikelihood and greedy generation on any causal LM.
* :mod:`lmforge.eval.tasks`: the built-in tasks (lambada, boolq, race, piqa, hellaswag, winogrande,
  wikitext2, wikitext103) and user tasks from YAML.
* :mod:`lmforge.eval.data`: task records from local files, a prefetch cache, or the Hub.
* :mod:`lmforge.eval.evaluate`: the stage (``run``), results tables and ``compare``.
* :mod:`lmforge.eval.harness`: the ``lmforge`` model for ``lm_eval --model lmforge``.

The names below are imported on first use (:mod:`lmforge.lazy`): registering the commands imports no torch.
"""

from lmforge.lazy import lazy_exports

__all__ = ["run", "evaluate_model", "compare", "Scorer", "rolling_windows", "get_task", "known_tasks"]
__getattr__, __dir__ = lazy_exports(__name__, {"run": "lmforge.eval.evaluate", "evaluate_model": "lmforge.eval.evaluate",
                                               "compare": "lmforge.eval.evaluate", "Scorer": "lmforge.eval.scorer",
                                               "rolling_windows": "lmforge.eval.scorer",
                                               "get_task": "lmforge.eval.tasks", "known_tasks": "lmforge.eval.tasks"})
