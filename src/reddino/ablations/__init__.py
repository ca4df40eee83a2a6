"""The paper's ablation grid: one Hydra multirun job per variant (``reddino-ablations -m``), then one
summary of every job directory (``reddino-ablations-summary``): CSV, Markdown and Figure 2."""

ERROR_FILE = "error.txt"  # the traceback of a failed job, in its job directory
