"""Research tooling on top of the trainer.

  ablation   a resumable grid of variants x seeds (scripts/run_ablation.py)
  report     results.csv, the mean +- std table, the paper's orderings checked
  plots      PNG plots of grids and of expert analyses
  experts    expert-specialisation analyses of a trained checkpoint
             (scripts/analyze_experts.py, notebooks/expert_specialization.ipynb)
"""
