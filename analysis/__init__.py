"""Pure analysis of logged runs: load, convergence, schedules, FLOPs, comparison.

Modules: ``io`` (the only one that talks to MLflow), ``convergence``, ``schedule``, ``flops``,
``compare``, ``synthetic`` (runs with known convergence, for tests and demos); ``attribution``
(captum) is the only one that needs torch. Nothing is imported here, so that importing one
module does not pull in the others (and ``mlflow``/``scipy``) at start-up.
"""
