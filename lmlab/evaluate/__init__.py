"""`lmlab eval`: what a language model does from a prompt alone, zero- and few-shot, with no gradient update.

    from lmlab.evaluate import run_eval
    summary = run_eval("smollm2-135m-instruct", "sst2,piqa,lambada", shots=[0, 1, 4, 8], limit=200,
                       calibrate=True, out="results/eval.json")

Files: lm.py is the model interface (loglikelihood, loglikelihood_rolling, generate_until); tasks/ the task table,
the tasks' data and, per kind of task, its scoring (tasks/choice.py: multiple choice, classification, regression
and contextual calibration; tasks/language_modeling.py: perplexity and LAMBADA; tasks/math.py: word problems);
answers.py reads answers out of generated text; metrics.py the metrics; report.py the table, JSON, jsonl and
plot; evaluator.py runs them. This file is the package's public face: submodules do not import it.

Standard errors: bootstrap over examples (documents for perplexity), 1000 resamples.
"""

from lmlab.evaluate.answers import parse_answer
from lmlab.evaluate.evaluator import MODES, run_eval
from lmlab.evaluate.lm import LM

__all__ = ["run_eval", "LM", "parse_answer", "MODES"]
