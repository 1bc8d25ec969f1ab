"""manyways: teach a language model many ways to solve a problem before RL.

Implements "Mid-Training with Self-Generated Data Improves Reinforcement Learning in
Language Models" (arXiv 2605.08472). The pipeline is a chain of stages that exchange files:
generate -> verify -> score -> select -> midtrain -> rl -> evaluate -> analyze -> report.
"""

__version__ = "0.1.0"

import os as _os

if _os.environ.get("MANYWAYS_RECORD_READS"):  # which config keys this process reads (manyways.keyuse)
    from manyways.keyuse import record_from_env

    record_from_env()
